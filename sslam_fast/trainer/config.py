"""The training run as data: one JSON file validated into dataclasses, plus ``--set key=value``.

Sections: model (``SSLAMConfig``), data, train, optim, checkpoint, logging, deepspeed. Batch sizes,
the LR schedule and the EMA schedule are stated in clips and optimizer updates, never per GPU, so
the same file means the same run on 1, 8 or 64 GPUs (docs/method.md §8).
"""
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ..config import AT_LEAST_0, AT_LEAST_1, FRACTION, POSITIVE, ConfigError, Range, SSLAMConfig, check_ranges, from_dict
from ..mixing import scaled_mix_windows, windows_fit

EXECUTIONS = {"fast": ("auto", "bf16", "fp32"), "original": ("auto", "fp16", "fp32")}  # execution -> precisions


@dataclass
class DataConfig:
    manifest: str = ""  # fairseq manifest (first line root, then rel/path<TAB>n) or a folder
    demo_clips: int = 0  # > 0: write this many synthetic clips under checkpoint.dir and train on them
    target_length: int = 1024
    norm_mean: float = -4.268
    norm_std: float = 4.569
    backend: str = "auto"  # "torch", "dali", or "auto" (DALI where installed)
    num_workers: int = 8
    prefetch: int = 2  # batches read ahead by a background thread while the step computes
    max_skips_in_a_row: int = 1000  # unreadable entries in a row (or a whole epoch) that stop the run

    RANGES = {"demo_clips": AT_LEAST_0, "target_length": Range(1, 65536), "norm_std": POSITIVE, "num_workers": Range(0, 256),
              "prefetch": Range(1, 64), "max_skips_in_a_row": AT_LEAST_1}

    def validate(self, where: str = "data") -> None:
        if self.backend not in ("auto", "torch", "dali"):
            raise ConfigError(f"{where}.backend: must be 'auto', 'torch' or 'dali', got {self.backend!r}")
        if not self.manifest and self.demo_clips <= 0:
            raise ConfigError(f"{where}.manifest: set a manifest (or data.demo_clips for synthetic clips)")
        if self.manifest and self.demo_clips > 0:
            raise ConfigError(f"{where}.manifest={self.manifest} and {where}.demo_clips={self.demo_clips} are both set: "
                              "add --set data.demo_clips=0 to train on the manifest, or drop the manifest")


@dataclass
class TrainSection:
    global_batch: int = 48  # clips per optimizer update, over all GPUs and accumulation steps
    max_micro_batch: int = 12  # most clips per GPU per forward; gradient accumulation covers the rest
    max_steps: int = 400_000  # optimizer updates; the run stops here
    # "fast": bf16 + the fused implementation ("compiled" with compile); "original": the reference
    # execution the speed ratios are measured against (fp16 weights, fp32 masters, dynamic loss
    # scaling, the model's "original" implementation)
    execution: str = "fast"
    # "auto" (bf16 for fast, fp16 for original), "bf16" (fast), "fp16" (original) or "fp32" (either;
    # DeepSpeed runs no fp16 on a CPU, so CPU runs of the original execution use fp32)
    precision: str = "auto"
    compile: bool = False  # torch.compile the whole static-shape step, fullgraph (implementation "compiled")
    cuda_graph: bool = False  # with compile: replay the compiled graphs as CUDA graphs (CUDA only)
    seed: int = 1
    init_from: Optional[str] = None  # weights to start from (stage 2: a stage-1 or EAT checkpoint)
    ema_from: str = "master"  # "master": EMA from the fp32 master weights; "model": from the bf16 weights
    max_bad_steps: int = 20  # consecutive non-finite steps before the run stops
    min_target_var: float = 0.1  # collapse alarm thresholds (docs/method.md §6), checked after collapse_after steps
    min_pred_var: float = 0.01
    collapse_after: int = 5000
    stop_on_collapse: bool = False

    RANGES = {"global_batch": AT_LEAST_1, "max_micro_batch": AT_LEAST_1, "max_steps": AT_LEAST_1, "seed": Range(0, 2**32 - 1),
              "max_bad_steps": AT_LEAST_1, "min_target_var": AT_LEAST_0, "min_pred_var": AT_LEAST_0, "collapse_after": AT_LEAST_0}

    def validate(self, where: str = "train") -> None:
        if self.execution not in EXECUTIONS:
            raise ConfigError(f"{where}.execution: must be 'fast' or 'original', got {self.execution!r}")
        allowed = EXECUTIONS[self.execution]
        if self.precision not in allowed:
            raise ConfigError(f"{where}.precision: must be one of {', '.join(allowed)} with "
                              f"{where}.execution={self.execution!r}, got {self.precision!r}")
        if self.execution == "original" and (self.compile or self.cuda_graph):
            raise ConfigError(f"{where}.compile / cuda_graph: the original execution runs eagerly; "
                              f"set {where}.execution='fast' to compile")
        if self.cuda_graph and not self.compile:
            raise ConfigError(f"{where}.cuda_graph: CUDA graphs replay the compiled step; set {where}.compile=true")
        if self.ema_from not in ("master", "model"):
            raise ConfigError(f"{where}.ema_from: must be 'master' or 'model', got {self.ema_from!r}")

    @property
    def dtype(self) -> str:
        """The precision the run uses: "bf16", "fp16" or "fp32" ("auto" resolved by the execution)."""
        if self.precision != "auto":
            return self.precision
        return "fp16" if self.execution == "original" else "bf16"

    @property
    def model_implementation(self) -> str:
        """The implementation the model runs with (``implementation.set_implementation``): the one
        switch of the trainer is ``execution`` (with ``compile``)."""
        if self.execution == "original":
            return "original"
        return "compiled" if self.compile else "fused"


@dataclass
class OptimConfig:
    lr: float = 5e-4  # peak
    min_lr: float = 0.0
    warmup_steps: int = 53_333
    cosine_steps: Optional[int] = None  # update at which the cosine reaches min_lr; None: train.max_steps
    betas: Tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.05  # not on biases, 1-D parameters and the CLS token
    clip_grad: float = 4.0

    # clip_grad positive: DeepSpeed's fp32 ZeRO optimizer only checks for non-finite gradients when clipping
    RANGES = {"lr": Range(0, 10, lo_open=True), "min_lr": Range(0, 10), "warmup_steps": AT_LEAST_0, "cosine_steps": AT_LEAST_1,
              "betas": FRACTION, "eps": Range(0, 1, lo_open=True), "weight_decay": AT_LEAST_0, "clip_grad": POSITIVE}

    def validate(self, where: str = "optim") -> None:
        if self.min_lr > self.lr:
            raise ConfigError(f"{where}.min_lr: {self.min_lr} is above {where}.lr={self.lr}")


@dataclass
class CheckpointConfig:
    dir: str = "runs/as2m"
    every_steps: int = 10_000
    keep_last: int = 3
    resume: bool = True  # continue from the newest complete checkpoint in dir

    RANGES = {"every_steps": AT_LEAST_1, "keep_last": AT_LEAST_1}


@dataclass
class LoggingConfig:
    every_steps: int = 50  # metrics lines (JSON lines + TensorBoard) and progress-bar refresh
    tensorboard: bool = True
    progress_bar: bool = True

    RANGES = {"every_steps": AT_LEAST_1}


@dataclass
class DeepSpeedSection:
    zero_stage: int = 0  # the cheapest that fits ViT-B (benchmarks/RESULTS.md, ZeRO stages); 1-2 shard the optimizer
    extra: Dict[str, Any] = field(default_factory=dict)  # merged into the generated DeepSpeed config

    def validate(self, where: str = "deepspeed") -> None:
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"{where}.zero_stage: must be 0, 1 or 2 (ZeRO-3 does not pay for a model of this "
                              "size, and the EMA teacher needs the whole fp32 masters each step: README, ZeRO stage)")


@dataclass
class TrainConfig:
    model: SSLAMConfig = field(default_factory=SSLAMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)

    def validate(self, where: str = "config") -> None:
        """Check every section, including those left at their defaults, and what they say together."""
        for name in ("model", "data", "train", "optim", "checkpoint", "logging", "deepspeed"):
            section = getattr(self, name)
            check_ranges(section, f"{where}.{name}")
            if hasattr(section, "validate"):
                section.validate(f"{where}.{name}")
        m, frames = self.model, self.data.target_length
        if frames < m.patch_size:
            raise ConfigError(f"{where}.data.target_length: {frames} frames, fewer than one patch "
                              f"({where}.model.patch_size={m.patch_size})")
        if m.stage == 2 and not windows_fit(frames, m.mix_window, m.mix_w1_max, m.mix_w2_max):
            window, w1, w2 = scaled_mix_windows(frames, m.patch_size)
            raise ConfigError(
                f"{where}.model.mix_window={m.mix_window}, mix_w1_max={m.mix_w1_max}, mix_w2_max={m.mix_w2_max}: the "
                f"stage-2 mixing windows do not fit {where}.data.target_length={frames} frames (need mix_w2_max + "
                f"mix_window <= target_length and mix_w1_max + mix_window <= mix_w2_max); the recipe scaled to "
                f"{frames} frames is --set model.mix_window={window} --set model.mix_w1_max={w1} --set model.mix_w2_max={w2}")

    @property
    def cosine_steps(self) -> int:
        return self.optim.cosine_steps or self.train.max_steps


def apply_override(data: Dict[str, Any], assignment: str) -> None:
    """Apply ``section.key=value`` to the raw config dict; value is JSON, else a plain string."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected key=value")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    *path, last = key.split(".")
    node = data
    for part in path:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
    node[last] = value


def load_config(path: Optional[str] = None, overrides: List[str] = (), cls: type = None) -> Any:
    """Read ``path`` (JSON), apply ``overrides``, validate into ``cls`` (default ``TrainConfig``);
    unknown keys raise ConfigError naming them."""
    data: Dict[str, Any] = {}
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--config {path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object of sections, got {type(data).__name__}")
    data.pop("_comment", None)
    for assignment in overrides:
        apply_override(data, assignment)
    return from_dict(cls or TrainConfig, data, where=path or "config")
