"""The EMA teacher (docs/method.md §5): an fp32 copy of the student encoder, updated after each step
(``SSLAMPretrainer.update_teacher``, through ``sslam_kernels.FusedEMA``)."""
import copy
import torch.nn as nn


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
