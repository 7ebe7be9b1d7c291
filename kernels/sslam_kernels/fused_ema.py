"""``FusedEMA``: the one-launch EMA update for any (student, teacher) pair of modules, the one
EMA entry point of ``sslam_kernels``.

Parameters are matched by name (a ``module.`` prefix from DDP / DeepSpeed wrappers is ignored);
two lists of tensors are matched by position. A student parameter that does not require grad
(e.g. data2vec 2.0's fixed positional table) is copied into the teacher instead of blended, as
fairseq's EMAModule does. Three layouts are handled:

- replicated student (single GPU, DDP, ZeRO-1/2): whole tensors are blended;
- ZeRO-3 student (DeepSpeed sets ``param.ds_tensor``, the rank's flat local shard): a full teacher
  has only this rank's slice updated (gather it yourself if every rank needs the full teacher),
  a ZeRO-3 teacher has its own local shard blended with the student's;
- DTensor (FSDP2) student and teacher with the same placements: the local shards are blended.
"""
import dataclasses
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .ema import EMAPair, EMAPlan, ema_update_pairs


def _strip(name: str) -> str:
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def _zero3_rank(param: torch.Tensor) -> int:
    import torch.distributed as dist

    return dist.get_rank(group=getattr(param, "ds_process_group", None))


def _named(x: Union[nn.Module, Mapping[str, torch.Tensor], Sequence[torch.Tensor]]) -> Dict[str, torch.Tensor]:
    if isinstance(x, nn.Module):
        return {_strip(n): p for n, p in x.named_parameters()}
    if isinstance(x, Mapping):
        return {_strip(n): t for n, t in x.items()}
    return {str(i): t for i, t in enumerate(x)}


def _local(x: torch.Tensor) -> torch.Tensor:
    return x.to_local() if hasattr(x, "to_local") else x


def _shadow_local(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if x is None:
        return None
    return x.ds_tensor if hasattr(x, "ds_tensor") else _local(x)


class FusedEMA:
    """teacher <- decay * teacher + (1 - decay) * student over all matched parameters.

    student: any nn.Module (may be wrapped by DDP / DeepSpeed; parameters fp32 or bf16), or a
        list of tensors (e.g. an optimizer's fp32 master copies) matched by position.
    teacher: an nn.Module whose parameters (fp32) are a subset, by name, of the student's, a
        dict of fp32 tensors by name (e.g. fairseq EMAModule's ``fp32_params``), or a list of fp32
        tensors as long as the student's list.
    names: optional iterable of teacher parameter names to update (default: all of them; for
        lists the names are the positions "0", "1", ...).
    shard_rank: for ZeRO-3 students, the function giving a parameter's rank in its partition
        group (default: torch.distributed.get_rank of ``param.ds_process_group``).

    backend: "auto" (Triton for CUDA tensors, the reference otherwise), "triton" or "torch".
    shadow: optional bf16 / fp16 copy of the teacher (a module, dict or list like ``teacher``,
        matched the same way) rewritten by every update from the new fp32 values, in the same
        pass (for a bf16 teacher forward that then casts nothing).

    ``update(decay)`` launches one Triton kernel on CUDA (the chunk table is built once and rebuilt
    only if a parameter's storage moves or a parameter is frozen / unfrozen) and runs the same
    update per tensor in torch on CPU. Student tensors given as a list are always blended.
    """

    def __init__(self, student: Union[nn.Module, Sequence[torch.Tensor]],
                 teacher: Union[nn.Module, Sequence[torch.Tensor]], names: Optional[Iterable[str]] = None,
                 shard_rank: Callable[[torch.Tensor], int] = _zero3_rank, backend: str = "auto",
                 shadow: Union[nn.Module, Sequence[torch.Tensor], None] = None):
        s_params, t_params = _named(student), _named(teacher)
        sh_params = {} if shadow is None else _named(shadow)
        if not isinstance(student, (nn.Module, Mapping)) and len(s_params) != len(t_params):
            raise ValueError(f"{len(t_params)} teacher tensors vs {len(s_params)} student tensors")
        names = list(t_params) if names is None else [_strip(n) for n in names]
        missing = [n for n in names if n not in s_params or n not in t_params]
        if missing:
            raise KeyError(f"parameters missing from the student or teacher: {missing[:5]}")
        self.names: List[str] = names
        self._students = [s_params[n] for n in names] if isinstance(student, nn.Module) else []
        if shadow is not None and any(n not in sh_params for n in names):
            raise KeyError(f"parameters missing from the shadow: {[n for n in names if n not in sh_params][:5]}")
        self._units = [[dataclasses.replace(p, shadow=_shadow_local(sh_params.get(n)))
                        for p in self._pairs_for(n, t_params[n], s_params[n], shard_rank)] for n in names]
        self._frozen = None
        self.pairs: List[EMAPair] = []
        self.copies: List[EMAPair] = []
        self._plan: Optional[EMAPlan] = None
        self.backend = backend

    def _split(self) -> None:
        """Blend the pairs of trained parameters, copy those of frozen ones (when they change)."""
        frozen = tuple(not p.requires_grad for p in self._students)
        if frozen == self._frozen:
            return
        self._frozen = frozen
        is_frozen = frozen or (False,) * len(self._units)
        self.pairs = [p for f, unit in zip(is_frozen, self._units) if not f for p in unit]
        self.copies = [p for f, unit in zip(is_frozen, self._units) if f for p in unit]
        self._plan = None

    @staticmethod
    def _pairs_for(name, t, s, shard_rank) -> List[EMAPair]:
        if hasattr(s, "ds_tensor"):
            part = s.ds_tensor.ds_numel
            if hasattr(t, "ds_tensor"):
                return [EMAPair(t.ds_tensor, s.ds_tensor, 0, part)]
            if t.numel() != s.ds_numel:
                raise ValueError(f"{name}: teacher numel {t.numel()} != student {s.ds_numel}")
            start = part * shard_rank(s)
            count = max(0, min(part, s.ds_numel - start))
            return [EMAPair(t, s.ds_tensor, start, count)] if count else []
        if hasattr(s, "to_local") != hasattr(t, "to_local"):
            raise TypeError(f"{name}: student and teacher must both or neither be DTensors")
        s, t = _local(s), _local(t)
        if t.numel() != s.numel():
            raise ValueError(f"{name}: teacher numel {t.numel()} != student numel {s.numel()}")
        return [EMAPair(t, s)]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """One EMA step with this decay (a python float; any value, no recompilation)."""
        self._split()
        self._plan = ema_update_pairs(self.pairs, decay, self._plan, self.backend, self.copies)
