"""EMA teacher update: teacher <- decay * teacher + (1 - decay) * student.

The PyTorch references (also the CPU fallback). The teacher is kept in fp32; the student may be
fp32 or bf16.
"""
from typing import Sequence

import torch


@torch.no_grad()
def ema_update_reference(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor],
                         decay: float) -> None:
    """Per-tensor loop, in the order fairseq's EMAModule applies it (scale, then add)."""
    for t, s in zip(teacher, student):
        t.mul_(decay).add_(s.to(t.dtype), alpha=1 - decay)


@torch.no_grad()
def ema_update_foreach(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor],
                       decay: float) -> None:
    """Same update with torch's multi-tensor ops (few launches on the GPU)."""
    teacher = list(teacher)
    student = [s.to(t.dtype) for t, s in zip(teacher, student)]
    torch._foreach_mul_(teacher, decay)
    torch._foreach_add_(teacher, student, alpha=1 - decay)
