"""What the trainer hands to DeepSpeed, and how it gets the fp32 weights back out.

The engine owns the student and the decoder (``StudentAndDecoder``); the EMA teacher stays outside
it, in fp32, on every rank, and is updated from the fp32 master weights. With bf16 (any ZeRO stage)
or ZeRO-1/2 those masters are flat fp32 partitions spread over the ranks; ``MasterWeights`` gathers
them with one all-gather per parameter group into a persistent fp32 buffer and exposes per-parameter
views. Cost per step: one fp32 copy of the student + decoder received by every rank (~350 MB for
ViT-B), which is why ``train.ema_from = "model"`` (EMA from the bf16 weights, as the fp16 original
did) exists as the cheap alternative. With one process (or DeepSpeed's unsharded fp16 masters) the
views point into the optimizer's own fp32 masters: no second copy is kept and nothing is copied.
"""
import atexit
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from ..pretrainer import SSLAMPretrainer
from .config import TrainConfig
from .optim import BatchPlan


def init_distributed(local_rank: int = -1) -> torch.device:
    """Join the process group set up by deepspeed / torchrun, or make a one-process group.

    The group lives until the process exits (DeepSpeed caches its sub-groups, so a second run in
    the same process reuses the first group rather than making a new one).
    """
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    alone = os.environ["WORLD_SIZE"] == "1"
    if local_rank >= 0:
        os.environ["LOCAL_RANK"] = str(local_rank)
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if not cuda:
        # DeepSpeed JIT-compiles a shared-memory all-reduce for CPUs (minutes); gloo does the job here.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    if not dist.is_initialized():
        if alone:  # a one-process group in memory: no TCP port to pick, so no race with other programs for one
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        deepspeed.init_distributed(dist_backend=backend)  # joins the group made above, or the launcher's
        atexit.register(dist.destroy_process_group)
    if cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


class StudentAndDecoder(nn.Module):
    """The trainable part of an ``SSLAMPretrainer``, as a module for the engine.

    Its children are the pretrainer's own student and decoder (shared, not copied); the pretrainer
    is held without registering it, so the teacher is neither cast, nor sharded, nor optimized.
    ``autocast``: the dtype the whole step (the fp32 teacher included) computes in; it is set here,
    inside the engine's forward, because DeepSpeed switches off an autocast entered outside it.
    """

    def __init__(self, model: SSLAMPretrainer, autocast: Optional[torch.dtype] = None):
        super().__init__()
        self.student = model.student
        self.decoder = model.decoder
        self.autocast = autocast
        object.__setattr__(self, "pretrainer", model)
        # DeepSpeed handles every parameter as one dense block (the start-up broadcast views it as
        # bytes; ZeRO-1/2 moves it into a flat buffer): store them contiguous. A layout a module wants
        # (the decoder's channels-last conv weights) it makes per call from the contiguous weight.
        for p in self.parameters():
            if not p.is_contiguous():
                p.data = p.data.contiguous()

    def forward(self, fbank: torch.Tensor, generator: torch.Generator,
                host_generator: Optional[torch.Generator] = None, stats: bool = True) -> Dict[str, Any]:
        with torch.autocast(fbank.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            return self.pretrainer(fbank, generator=generator, host_generator=host_generator, stats=stats)


def gradient_norm(params) -> Optional[torch.Tensor]:
    """The global L2 norm of the gradients ``params`` hold (before clipping), left on their device
    (no host sync: the caller reads it one step late). None when they hold none: with bf16 or
    ZeRO-1/2 the reduced gradients live in DeepSpeed's partitions, and DeepSpeed reports their norm
    (``engine.get_global_grad_norm()``), which it does not with fp32 ZeRO-0."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)).float())


def deepspeed_config(cfg: TrainConfig, plan: BatchPlan) -> Dict[str, Any]:
    ds = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.accumulation,
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": cfg.train.dtype == "bf16"},
        # the original's fp16: fp32 masters, dynamic loss scaling from fairseq's initial scale 2^7
        "fp16": {"enabled": cfg.train.dtype == "fp16", "loss_scale": 0, "initial_scale_power": 7},
        "steps_per_print": 2**62,
        "zero_allow_untested_optimizer": True,
    }
    return _merge(ds, cfg.deepspeed.extra)


def _merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class MasterWeights:
    """fp32 master copies of ``params`` (engine-owned parameters), gathered on every rank, and the
    optimizer state that goes with them, whole (``full_state``) or into this partitioning
    (``load_full_state``): what an elastic resume moves between world sizes and ZeRO stages.

    Two layouts: flat (ZeRO-1/2, DeepSpeed's BF16_Optimizer), where the base optimizer's group i
    holds one flat fp32 partition per rank and its state (exp_avg, exp_avg_sq) is partitioned the
    same way; per parameter (ZeRO-0), where the base optimizer holds one fp32 tensor per parameter.
    """

    STATE_KEYS = ("exp_avg", "exp_avg_sq")

    def __init__(self, engine, params: Sequence[nn.Parameter]):
        opt = engine.optimizer
        self.params = list(params)
        self.base = getattr(opt, "optimizer", opt)  # the torch AdamW that holds the state
        flats, self.parts, shards = [], [], dist.get_world_size()
        if hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO-1/2: flat, sharded
            flats, self.parts = opt.bit16_groups_flat, opt.single_partition_of_fp32_groups
        elif hasattr(opt, "fp32_groups_flat_partition"):  # DeepSpeed's BF16_Optimizer: flat, sharded
            flats, self.parts = opt.bf16_groups_flat, opt.fp32_groups_flat_partition
        elif hasattr(opt, "fp32_groups_flat"):  # DeepSpeed's fused FP16_Optimizer (ZeRO-0 fp16): flat, whole
            flats, self.parts, shards = opt.fp16_groups_flat, opt.fp32_groups_flat, 1
        # One shard (one GPU, or unsharded masters): the views are the optimizer's own fp32 masters, so
        # no second fp32 copy is kept or refreshed; otherwise one gathered copy on every rank.
        self.full = [part if shards == 1 else torch.empty(flat.numel(), dtype=torch.float32, device=flat.device)
                     for part, flat in zip(self.parts, flats)]
        for part, full in zip(self.parts, self.full):
            if part.numel() * shards != full.numel():
                raise RuntimeError("DeepSpeed's fp32 partitions do not tile its flat buffer; use train.ema_from=model")
        if flats:
            self.views: List[torch.Tensor] = [self._locate(p, flats) for p in params]
        elif hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):  # ZeRO-0 bf16: one fp32 copy per param
            copies = {id(p): m for ps, ms in zip(opt.fp16_groups, opt.fp32_groups) for p, m in zip(ps, ms)}
            self.views = [copies[id(p)] for p in params]
        else:
            self.views = list(params)
        if any(v.dtype != torch.float32 for v in self.views):
            raise RuntimeError(f"no fp32 master weights found in {type(opt).__name__}; use train.ema_from=model")

    def _locate(self, p: nn.Parameter, flats: Sequence[torch.Tensor]) -> torch.Tensor:
        for flat, full in zip(flats, self.full):
            start = (p.data_ptr() - flat.data_ptr()) // p.element_size()
            if 0 <= start and start + p.numel() <= flat.numel():
                return full[start:start + p.numel()].view(p.shape)
        raise RuntimeError(f"parameter of shape {list(p.shape)} is not in the optimizer's flat buffers")

    @staticmethod
    def _all_gather(full: torch.Tensor, part: torch.Tensor) -> None:
        world = dist.get_world_size()
        if world == 1:
            full.copy_(part)
        elif dist.get_backend() == "nccl":
            dist.all_gather_into_tensor(full, part)
        else:
            dist.all_gather(list(full.chunk(world)), part)

    @torch.no_grad()
    def gather(self) -> List[torch.Tensor]:
        """Refresh the fp32 copies from every rank's partition (nothing to do with one shard) and return
        them, in ``params`` order."""
        for part, full in zip(self.parts, self.full):
            if full is not part:
                self._all_gather(full, part)
        return [v.detach() for v in self.views]

    def _views_of(self, fulls: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Per-parameter views of buffers laid out like ``self.full`` (the masters' layout)."""
        out = []
        for view in self.views:
            for full, other in zip(self.full, fulls):
                start = view.data_ptr() - full.data_ptr()
                if 0 <= start < full.numel() * full.element_size():
                    start //= full.element_size()
                    out.append(other[start:start + view.numel()].view(view.shape))
                    break
        return out

    @torch.no_grad()
    def full_state(self) -> Dict[str, Any]:
        """(Collective.) The whole fp32 optimizer state, per parameter in ``params`` order, on every
        rank: ``master``, ``exp_avg``, ``exp_avg_sq`` (absent before the first step) and ``step``."""
        masters = [m.clone() for m in self.gather()]
        state: Dict[str, Any] = {"master": masters}
        if self.parts:
            per_group = [self.base.state.get(part, {}) for part in self.parts]
            if all(per_group):
                for key in self.STATE_KEYS:
                    fulls = [torch.zeros_like(full) for full in self.full]
                    for full, part_state in zip(fulls, per_group):
                        self._all_gather(full, part_state[key])
                    state[key] = [v.clone() for v in self._views_of(fulls)]
                state["step"] = float(per_group[0]["step"])
        else:
            per_param = [self.base.state.get(view, {}) for view in self.views]
            if all(per_param):
                for key in self.STATE_KEYS:
                    state[key] = [s[key].detach().clone() for s in per_param]
                state["step"] = float(per_param[0]["step"])
        return state

    @torch.no_grad()
    def load_full_state(self, state: Dict[str, Any]) -> None:
        """Put a ``full_state`` (from any world size and ZeRO stage) into this rank's partitions:
        masters, optimizer state and the engine's own (bf16 or fp32) weights. Exact copies."""
        if len(state["master"]) != len(self.views):
            raise ValueError(f"{len(state['master'])} parameters in the saved optimizer state, {len(self.views)} here")
        for view, master, param in zip(self.views, state["master"], self.params):
            if view.shape != master.shape:
                raise ValueError(f"saved parameter of shape {list(master.shape)} where this model has {list(view.shape)}")
            view.copy_(master)
            param.data.copy_(master)
        rank, world = dist.get_rank(), dist.get_world_size()
        for part, full in zip(self.parts, self.full):
            part.copy_(full.chunk(world)[rank])
        if "step" not in state:
            return
        if self.parts:
            fulls = {key: [torch.zeros_like(full) for full in self.full] for key in self.STATE_KEYS}
            for key in self.STATE_KEYS:
                for view, value in zip(self._views_of(fulls[key]), state[key]):
                    view.copy_(value)
            for i, part in enumerate(self.parts):
                self.base.state[part] = {"step": torch.tensor(state["step"]), **{
                    key: fulls[key][i].chunk(world)[rank].clone() for key in self.STATE_KEYS}}
        else:
            for i, view in enumerate(self.views):
                self.base.state[view] = {"step": torch.tensor(state["step"]), **{
                    key: state[key][i].to(view.device).clone() for key in self.STATE_KEYS}}
