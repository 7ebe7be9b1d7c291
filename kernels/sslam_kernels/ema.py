"""EMA teacher update: teacher <- decay * teacher + (1 - decay) * student.

The teacher is kept in fp32; the student may be fp32 or bf16. ``FusedEMA`` (fused_ema.py) is the
user entry point; here are its one internal update, ``ema_update_pairs``, and the test oracle:

- ``ema_update_reference``: a per-tensor loop in fairseq's order (scale, then add).
- ``ema_update_pairs``: on CUDA every (teacher, student) pair in ONE Triton launch. A table holds
  one row per chunk of ``BLOCK`` elements (teacher address, student address, element count), so
  ~150 tensors of any sizes cost one launch; ``decay`` is a runtime scalar (no recompilation per
  value). Elsewhere the same update per tensor in torch.

Sharded students (ZeRO-3) are handled by pairing slices: each pair may name an element range of
the teacher (``EMAPair``), so a rank holding only its local student shard updates only the
matching slice of a full teacher, or its own teacher shard.

A pair may carry a ``shadow``: a bf16 / fp16 copy of the teacher that the same pass rewrites
from the new fp32 values (2 bytes more per element), so that a bf16 teacher forward reads
bf16 weights instead of casting the fp32 teacher on every pass.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from ._triton import triton, tl, triton_available

BLOCK = 4096  # elements per program: 16 fp32 vector loads per thread at 4 warps
_ALIGN_BYTES = 16


@torch.no_grad()
def ema_update_reference(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor],
                         decay: float) -> None:
    """Per-tensor loop, in the order fairseq's EMAModule applies it (scale, then add).

    teacher: fp32 tensors, updated in place. student: tensors of the same numels (fp32 or bf16).
    """
    for t, s in zip(teacher, student):
        t.mul_(decay).add_(s.to(t.dtype).view(t.shape), alpha=1 - decay)


@dataclass(frozen=True)
class EMAPair:
    """One unit of the update: ``teacher.view(-1)[t_start : t_start + count]`` is blended with
    ``student.view(-1)[:count]``. Both tensors contiguous; teacher fp32; student fp32 or bf16."""

    teacher: torch.Tensor
    student: torch.Tensor
    t_start: int = 0
    count: Optional[int] = None
    shadow: Optional[torch.Tensor] = None  # bf16 / fp16, the teacher's shape; rewritten from its new values

    def resolved_count(self) -> int:
        return self.student.numel() if self.count is None else self.count


if triton_available:

    @triton.jit
    def _ema_kernel(table_ptr, num_chunks, decay, one_minus_decay,
                    S_DTYPE: tl.constexpr, SHADOW_DTYPE: tl.constexpr, HAS_SHADOW: tl.constexpr,
                    ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
        # table rows (int64): [0] teacher chunk address, [1] student chunk address, [2] count,
        # [3] shadow chunk address (HAS_SHADOW)
        chunk = tl.program_id(0)
        t_ptr = tl.load(table_ptr + chunk).to(tl.pointer_type(tl.float32))
        s_ptr = tl.load(table_ptr + num_chunks + chunk).to(tl.pointer_type(S_DTYPE))
        n = tl.load(table_ptr + 2 * num_chunks + chunk)
        if ALIGNED:
            t_ptr = tl.multiple_of(t_ptr, 16)
            s_ptr = tl.multiple_of(s_ptr, 16)
        offs = tl.arange(0, BLOCK)
        m = offs < n
        t = tl.load(t_ptr + offs, mask=m)
        s = tl.load(s_ptr + offs, mask=m).to(tl.float32)
        t = t * decay + s * one_minus_decay
        tl.store(t_ptr + offs, t, mask=m)
        if HAS_SHADOW:
            sh_ptr = tl.load(table_ptr + 3 * num_chunks + chunk).to(tl.pointer_type(SHADOW_DTYPE))
            tl.store(sh_ptr + offs, t.to(SHADOW_DTYPE, fp_downcast_rounding="rtne"), mask=m)


STUDENT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # both paths; Triton's names below
_TL_DTYPES = {}
if triton_available:
    _TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


class EMAPlan:
    """The chunk tables for a fixed list of pairs (rebuilt only when storage moves).

    One table (and one launch) per (student dtype, alignment) group; for the usual case of one
    student dtype and allocator-aligned parameters that is a single launch.
    """

    def __init__(self, pairs: Sequence[EMAPair]):
        self.pairs = list(pairs)
        self.groups: List[Tuple[torch.dtype, Optional[torch.dtype], bool, torch.Tensor, int]] = []
        by_key = {}
        for p in self.pairs:
            _check_pair(p)
            t_addr = p.teacher.data_ptr() + 4 * p.t_start
            s_addr = p.student.data_ptr()
            sh = p.shadow
            sh_addr = 0 if sh is None else sh.data_ptr() + sh.element_size() * p.t_start
            aligned = t_addr % _ALIGN_BYTES == 0 and s_addr % _ALIGN_BYTES == 0
            by_key.setdefault((p.student.dtype, None if sh is None else sh.dtype, aligned), []).append(
                (t_addr, s_addr, p.resolved_count(), p.student.element_size(), sh_addr,
                 0 if sh is None else sh.element_size()))
        device = self.pairs[0].teacher.device if self.pairs else None
        for (dtype, shadow_dtype, aligned), rows in by_key.items():
            t_base, s_base, count, s_size, sh_base, sh_size = torch.tensor(rows, dtype=torch.int64).unbind(1)
            num = (count + BLOCK - 1) // BLOCK
            owner = torch.repeat_interleave(torch.arange(len(rows)), num)
            if owner.numel() == 0:
                continue
            first = torch.cumsum(num, 0) - num
            start = (torch.arange(owner.numel()) - first[owner]) * BLOCK
            table = torch.stack([t_base[owner] + 4 * start, s_base[owner] + s_size[owner] * start,
                                 torch.clamp(count[owner] - start, max=BLOCK),
                                 sh_base[owner] + sh_size[owner] * start])
            self.groups.append((dtype, shadow_dtype, aligned, table.to(device), owner.numel()))
        self.key = _storage_key(self.pairs)

    def launch(self, decay: float) -> None:
        for dtype, shadow_dtype, aligned, table, num_chunks in self.groups:
            _ema_kernel[(num_chunks,)](table, num_chunks, float(decay), float(1.0 - decay),
                                       S_DTYPE=_TL_DTYPES[dtype],
                                       SHADOW_DTYPE=_TL_DTYPES[shadow_dtype or torch.bfloat16],
                                       HAS_SHADOW=shadow_dtype is not None, ALIGNED=aligned, BLOCK=BLOCK,
                                       num_warps=4)


def _storage_key(pairs: Sequence[EMAPair]) -> Tuple[int, ...]:
    return tuple(x for p in pairs for x in (p.teacher.data_ptr(), p.student.data_ptr(),
                                            0 if p.shadow is None else p.shadow.data_ptr()))


def _check_pair(p: EMAPair) -> None:
    if p.teacher.dtype != torch.float32:
        raise TypeError(f"EMA teacher must be fp32, got {p.teacher.dtype}")
    if p.student.dtype not in STUDENT_DTYPES:
        raise TypeError(f"EMA student must be torch.float32, torch.bfloat16 or torch.float16, got {p.student.dtype}")
    if not (p.teacher.is_contiguous() and p.student.is_contiguous()):
        raise ValueError("EMA tensors must be contiguous")
    if p.teacher.device != p.student.device:
        raise ValueError(f"teacher on {p.teacher.device}, student on {p.student.device}")
    sh = p.shadow
    if sh is not None and (sh.dtype not in (torch.bfloat16, torch.float16) or sh.numel() != p.teacher.numel()
                           or not sh.is_contiguous() or sh.device != p.teacher.device):
        raise ValueError(f"EMA shadow must be a contiguous bf16/fp16 tensor like the teacher, got {sh.dtype} "
                         f"{tuple(sh.shape)} on {sh.device}")
    count = p.resolved_count()
    if count > p.student.numel() or p.t_start + count > p.teacher.numel() or p.t_start < 0:
        raise ValueError(f"EMA pair out of range: teacher {tuple(p.teacher.shape)} from "
                         f"{p.t_start}, student {tuple(p.student.shape)}, count {count}")


def _flat_slices(p: EMAPair) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    _check_pair(p)
    count = p.resolved_count()
    sh = None if p.shadow is None else p.shadow.view(-1)[p.t_start:p.t_start + count]
    return p.teacher.view(-1)[p.t_start:p.t_start + count], p.student.view(-1)[:count], sh


@torch.no_grad()
def ema_update_pairs(pairs: Sequence[EMAPair], decay: float, plan: Optional[EMAPlan] = None,
                     backend: str = "auto", copies: Sequence[EMAPair] = ()) -> Optional[EMAPlan]:
    """Blend every pair of ``pairs`` with ``decay``; copy every pair of ``copies`` (the student's
    frozen parameters, as fairseq's EMAModule does). backend: "auto" (Triton for CUDA tensors,
    torch otherwise), "triton" or "torch".

    Returns the plan so callers can pass it back (it is rebuilt if any storage moved)."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"unknown EMA backend {backend!r}")
    if backend == "triton" and not triton_available:
        raise RuntimeError("EMA backend 'triton' needs the triton package, which is not installed (pip install triton); "
                           "backend 'auto' or 'torch' runs the PyTorch path without it")
    for p in copies:
        t, s, sh = _flat_slices(p)
        t.copy_(s)
        if sh is not None:
            sh.copy_(t)
    pairs = list(pairs)
    if not pairs:
        return plan
    if backend == "triton" or (backend == "auto" and pairs[0].teacher.is_cuda and triton_available):
        if plan is None or plan.key != _storage_key(pairs):
            plan = EMAPlan(pairs)
        plan.launch(decay)
        return plan
    for p in pairs:
        t, s, sh = _flat_slices(p)
        t.mul_(decay).add_(s.to(torch.float32), alpha=1 - decay)
        if sh is not None:
            sh.copy_(t)
    return plan
