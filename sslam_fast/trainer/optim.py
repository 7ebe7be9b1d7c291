"""Optimizer, LR schedule and batch plan of docs/method.md §8.

Adam with decoupled weight decay (fairseq's "adam" is AdamW), betas (0.9, 0.95), wd 0.05 except on
biases, 1-D parameters (norms) and the CLS token; cosine decay after a linear warmup, in updates.
"""
import math
from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.nn as nn

from ..config import ConfigError
from .config import OptimConfig


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim <= 1 or name.endswith(".bias") or name.endswith("cls_token")


def param_groups(module: nn.Module, weight_decay: float) -> List[Dict]:
    """Two groups over the trainable parameters of ``module``: decayed and not decayed."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class SkipNonFiniteAdamW(torch.optim.AdamW):
    """AdamW that skips its step when a gradient is not finite and says so in ``overflow``.

    DeepSpeed's ZeRO and bf16 optimizers do this themselves; with ZeRO-0 in fp32 the engine drives
    this optimizer directly and reads ``overflow`` to skip the LR scheduler step as well.
    """

    overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.overflow = bool(grads) and not torch.stack(torch._foreach_norm(grads)).isfinite().all().item()
        if self.overflow:
            self.zero_grad(set_to_none=True)
            return None
        return super().step(closure)


def build_optimizer(module: nn.Module, cfg: OptimConfig, skip_non_finite: bool = True,
                    fused: bool = False) -> torch.optim.Optimizer:
    """AdamW over ``module``'s parameter groups. ``skip_non_finite``: the ``SkipNonFiniteAdamW`` check
    (a host sync per step), for the engines that do not skip non-finite steps themselves (fp32
    ZeRO-0); DeepSpeed's bf16 / fp16 optimizers check the gradients' norm and skip on their own.
    ``fused``: ``torch.optim.AdamW(fused=True)`` (CUDA parameters), one kernel for the update."""
    cls = SkipNonFiniteAdamW if skip_non_finite else torch.optim.AdamW
    return cls(param_groups(module, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
               weight_decay=cfg.weight_decay, fused=fused or None)


class CosineWithWarmup:
    """LR multiplier after ``step`` updates (LambdaLR calls it with the updates done): linear from 0
    to 1 over ``warmup`` updates, then a cosine from 1 to ``min_lr / lr`` at ``total`` updates."""

    def __init__(self, lr: float, min_lr: float, warmup: int, total: int):
        self.floor = min_lr / lr if lr > 0 else 0.0
        self.warmup = warmup
        self.total = total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    schedule = CosineWithWarmup(cfg.lr, cfg.min_lr, cfg.warmup_steps, total_steps)
    # A plain function keeps the schedule out of the scheduler's state_dict: the config decides it.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step))


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch of clips is split: world_size x accumulation x micro_batch."""

    global_batch: int
    world_size: int
    micro_batch: int
    accumulation: int


def plan_batch(global_batch: int, world_size: int, max_micro_batch: int) -> BatchPlan:
    """The largest micro batch <= ``max_micro_batch`` that splits ``global_batch`` evenly over
    ``world_size`` ranks and a whole number of accumulation steps."""
    if global_batch % world_size:
        raise ConfigError(f"train.global_batch={global_batch} is not divisible by the {world_size} processes")
    per_rank = global_batch // world_size
    accumulation = math.ceil(per_rank / max_micro_batch)
    while per_rank % accumulation:
        accumulation += 1
    return BatchPlan(global_batch, world_size, per_rank // accumulation, accumulation)
