"""``FusedEMA``: the one-launch EMA update for any (student, teacher) pair of modules.

Parameters are matched by name (a ``module.`` prefix from DDP / DeepSpeed wrappers is ignored).
Three layouts are handled:

- replicated student (single GPU, DDP, ZeRO-1/2): whole tensors are blended;
- ZeRO-3 student (DeepSpeed sets ``param.ds_tensor``, the rank's flat local shard): a full teacher
  has only this rank's slice updated (gather it yourself if every rank needs the full teacher),
  a ZeRO-3 teacher has its own local shard blended with the student's;
- DTensor (FSDP2) student and teacher with the same placements: the local shards are blended.
"""
from typing import Callable, Dict, Iterable, List, Optional

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


def _local(x: torch.Tensor) -> torch.Tensor:
    return x.to_local() if hasattr(x, "to_local") else x


class FusedEMA:
    """teacher <- decay * teacher + (1 - decay) * student over all matched parameters.

    student: any nn.Module (may be wrapped by DDP / DeepSpeed; parameters fp32 or bf16).
    teacher: an nn.Module whose parameters (fp32) are a subset, by name, of the student's.
    names: optional iterable of teacher parameter names to update (default: all of them).
    shard_rank: for ZeRO-3 students, the function giving a parameter's rank in its partition
        group (default: torch.distributed.get_rank of ``param.ds_process_group``).

    backend: "auto" (Triton for CUDA tensors, the reference otherwise), "triton" or "torch".

    ``update(decay)`` launches one Triton kernel on CUDA (the chunk table is built once and rebuilt
    only if a parameter's storage moves) and falls back to the per-tensor reference on CPU.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, names: Optional[Iterable[str]] = None,
                 shard_rank: Callable[[torch.Tensor], int] = _zero3_rank, backend: str = "auto"):
        s_params: Dict[str, torch.Tensor] = {_strip(n): p for n, p in student.named_parameters()}
        t_params: Dict[str, torch.Tensor] = {_strip(n): p for n, p in teacher.named_parameters()}
        names = list(t_params) if names is None else [_strip(n) for n in names]
        missing = [n for n in names if n not in s_params or n not in t_params]
        if missing:
            raise KeyError(f"parameters missing from the student or teacher: {missing[:5]}")
        self.names: List[str] = names
        self.pairs: List[EMAPair] = [
            pair for n in names for pair in self._pairs_for(n, t_params[n], s_params[n], shard_rank)]
        self._plan: Optional[EMAPlan] = None
        self.backend = backend

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
        self._plan = ema_update_pairs(self.pairs, decay, self._plan, self.backend)
