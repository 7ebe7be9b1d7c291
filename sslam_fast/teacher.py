"""The EMA teacher (SPEC 5): an fp32 copy of the student encoder, updated after each step."""
import copy
from typing import Iterable, List

import torch
import torch.nn as nn

import sslam_kernels


def ema_decay_at(step: int, start: float, end: float, anneal_end_step: int) -> float:
    """Decay after ``step`` updates: linear from ``start`` to ``end`` over ``anneal_end_step``, then ``end``."""
    if start == end or step >= anneal_end_step:
        return end
    return end - (end - start) * (1 - step / anneal_end_step)


def make_teacher(student: nn.Module) -> nn.Module:
    """An fp32, frozen, eval-mode copy of ``student``."""
    teacher = copy.deepcopy(student).float()
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student_params: Iterable[torch.Tensor], decay: float,
               use_kernels: bool = True) -> None:
    """teacher <- decay * teacher + (1 - decay) * student, over the teacher's parameters in order.

    ``student_params`` are the tensors to average in (the fp32 master copies where an optimizer
    keeps them, else the student's own parameters), matching ``teacher.parameters()`` one to one.
    With ``use_kernels``, CUDA tensors are updated in one Triton launch.
    """
    t_params: List[torch.Tensor] = list(teacher.parameters())
    s_params = [p.detach() for p in student_params]
    if len(t_params) != len(s_params):
        raise ValueError(f"teacher has {len(t_params)} parameters, student gave {len(s_params)}")
    for t, s in zip(t_params, s_params):
        if t.shape != s.shape:
            raise ValueError(f"teacher/student parameter shapes differ: {list(t.shape)} vs {list(s.shape)}")
    if use_kernels:
        sslam_kernels.FusedEMA(s_params, t_params).update(decay)
    else:
        sslam_kernels.ema_update_reference(t_params, s_params, decay)

