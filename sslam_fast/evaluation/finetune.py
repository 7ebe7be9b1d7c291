"""Fine-tuning and linear evaluation of a pretrained encoder: the recipes of docs/method.md §9.

Launched like pretraining: ``deepspeed sslam_fast/finetune.py --config configs/finetune_as20k.json``
(or torchrun, or one ``python`` process, or ``sslam-fast finetune``), with a JSON config validated
into the dataclasses below and ``--set section.key=value`` overrides.

What one run does, as the original EAT / SSLAM fine-tuning code does it:

- Model: the student encoder of a pretraining checkpoint (``load_pretrainer(path).student``, ours
  or the original fairseq layout), CLS token -> LayerNorm (eps 1e-6) -> Linear (truncated-normal
  std 0.02, zero bias). Drop path rises linearly from 0 in the first block to ``model.drop_path``
  in the last. ``model.freeze_encoder`` is linear evaluation: the encoder gets no gradient (it
  still runs in training mode, drop path included, as the original's linear evaluation does).
- Optimizer: AdamW (betas 0.9/0.95, wd 0.05 on every parameter: the original's model asks for none
  on biases and 1-D parameters, but its fairseq composite optimizer never applies that, so the
  published runs decayed them all; ``optim.decay_exclusions`` is the exclusion, a deviation).
  Layer decay as in the original for this model family: block i of L gets the LR times
  ``layer_decay ** (L - i)`` (the last block 0.65, the first 0.65^12 for ViT-B); the patch
  embedding, CLS token, input LayerNorm and the head keep the full LR. Each of those groups runs
  the original's own fairseq cosine schedule (``group_learning_rate``): linear warmup from
  ``optim.min_lr`` to its peak, cosine down to ``optim.min_lr`` itself; a group whose peak is
  below ``min_lr`` stays at its peak (``optim.lr_floor = "scaled"``, one multiplier for all, is a
  deviation).
- Data: a fairseq task directory (``data.dir``: ``<split>.tsv``, ``<split>.lbl``,
  ``label_descriptors.csv``); entries the manifest lists under ``data.min_samples`` (10,000)
  samples are left out of both splits, as the original's datasets do. Per clip in training: roll
  augmentation (the waveform rolled by a random offset and scaled by Beta(10, 10) + 0.5),
  optionally the SPC-2 noise (uniform noise on the fbank, a time shift of up to 10 frames).
  ``data.weights_file`` (one weight per manifest line) switches to balanced sampling: each epoch
  draws ``data.samples_per_epoch`` clips (at most the clips of positive weight) by those weights
  without replacement (``sslam_fast.evaluation.sampling``; ``sslam-fast balanced-weights`` writes
  the file).
- Per global batch in training, as the original's single-GPU forward of the whole batch: mixup
  (one lambda ~ Beta(a, a) with a = ``augment.mixup``, applied with probability
  ``augment.mixup_prob``, each clip mixed with its rank's share of the batch reversed, targets
  likewise), then SpecAugment-style masking: one frequency band of up to ``mask_ratio * 128``
  bins and one time span of up to ``mask_ratio * target_length`` frames per clip, set to 0.
- Loss, summed over the clips of the global batch and divided by its normaliser: multi-label
  (``data.task = "multilabel"``): BCE with logits summed over classes, divided by the sum of the
  targets (the original's sample size). Multi-class: cross entropy (soft targets when mixup is on;
  ``augment.label_smoothing`` otherwise), or with ``train.loss = "bce"`` BCE summed over classes
  (the original's Speech Commands recipe), divided by the clips.
- Evaluation on ``data.eval_split`` after every epoch as the original (``train.eval_every_epochs``;
  or every ``train.eval_every_steps``) and at the end: mAP (multi-label) or accuracy (multi-class),
  into metrics.jsonl and TensorBoard. ``final.json`` has the last and the best evaluation and, as
  ``value``, the one ``target.reported`` says the published score is.

``fidelity = "recipe"`` (the default) refuses every setting ``FinetuneConfig.deviations`` names;
``"custom"`` runs them and logs them.

Every random draw is reproducible: the epoch order from (seed, epoch), per-clip augmentation from
(seed, epoch, position, clip), the mixup lambda from (seed, step), the masks from (seed, rank,
step), drop path from torch's global generator, which is checkpointed. A resumed run repeats the
uninterrupted one exactly. ``runs`` repeats the recipe over folds or scenes (ESC-50 folds 1-5, the SPASS scenes):
``{run}`` in ``data.dir`` and ``data.weights_file`` is replaced by each entry and each run
writes under ``<checkpoint.dir>/<run>``; ``summary.json`` in ``checkpoint.dir`` has them all and
their means (of the reported values, of the last and of the best evaluations).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .. import data as _data
from ..config import AT_LEAST_0, AT_LEAST_1, EPS, POSITIVE, ConfigError, Range, SSLAMConfig, check_ranges, from_dict, to_dict
from ..data import audio as _audio
from ..model import Encoder
from ..released.formats import FINETUNE_FORMAT
from ..serialization import atomic_save
from ..trainer.checkpoints import (begin_save, finish_save, latest_checkpoint, load_engine_state,
                                   malformed_is_checkpoint_error, read_resume_state, remove_stale_temps,
                                   restore_rng_state, rng_state)
from ..trainer.config import CheckpointConfig, DeepSpeedSection, LoggingConfig, OptimConfig, load_config
from ..trainer.engine import MasterWeights, deepspeed_config, gradient_norm
from ..trainer.optim import CosineWithWarmup, SkipNonFiniteAdamW, plan_batch
from ..trainer.prefetch import Prefetcher
from ..trainer.runlog import RunLog
from ..trainer.session import TrainingStopped, run_session
from .metrics import accuracy, mean_average_precision
from .sampling import AS2M_SAMPLES_PER_EPOCH, BalancedSampler, read_weights

logger = logging.getLogger("sslam_fast.finetune")
TASKS = ("multilabel", "multiclass")
LR_FLOORS = ("absolute", "scaled")
FIDELITIES = ("recipe", "custom")
ORIGINAL_MIN_SAMPLES = 10_000  # the original datasets' min_sample_size


# ============================================================================== config
@dataclass
class FinetuneModelSection:
    init_from: str = ""  # pretraining checkpoint (ours or fairseq); empty: random weights (tests, baselines)
    encoder: Dict[str, Any] = field(default_factory=dict)  # SSLAMConfig values: overrides, or the architecture without init_from
    num_classes: int = 0  # 0: the number of rows of label_descriptors.csv
    drop_path: float = 0.1
    layer_decay: float = 0.65
    head_norm_eps: float = 1e-6
    freeze_encoder: bool = False  # linear evaluation

    RANGES = {"num_classes": AT_LEAST_0, "head_norm_eps": EPS}

    def validate(self, where: str = "model") -> None:
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"{where}.drop_path: must be in [0, 1)")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"{where}.layer_decay: must be in (0, 1]")
        if self.num_classes < 0:
            raise ConfigError(f"{where}.num_classes: must be >= 0")


@dataclass
class AugmentSection:
    mixup: float = 0.8  # Beta(a, a) parameter; 0 switches mixup off
    mixup_prob: float = 0.9
    mask_ratio: float = 0.2  # SpecAugment-style masks: up to this share of the bins and of the frames
    roll: bool = True
    noise: bool = False  # the original's Speech Commands v2 fbank noise and time shift
    label_smoothing: float = 0.0  # multi-class cross entropy without mixup

    def validate(self, where: str = "augment") -> None:
        if self.mixup < 0 or not 0.0 <= self.mixup_prob <= 1.0:
            raise ConfigError(f"{where}.mixup: mixup must be >= 0 and mixup_prob in [0, 1]")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"{where}.mask_ratio: must be in [0, 1)")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"{where}.label_smoothing: must be in [0, 1)")


@dataclass
class FinetuneDataSection:
    dir: str = ""  # fairseq task directory: <split>.tsv, <split>.lbl, label_descriptors.csv
    train_split: str = "train"
    eval_split: str = "eval"
    task: str = "multilabel"  # "multilabel" (BCE, mAP) or "multiclass" (CE, accuracy)
    weights_file: str = ""  # balanced sampling weights (one per train clip); empty: plain shuffled epochs
    samples_per_epoch: int = AS2M_SAMPLES_PER_EPOCH  # clips drawn per epoch with weights_file
    target_length: int = 1024
    norm_mean: float = -4.268
    norm_std: float = 4.569
    min_samples: int = ORIGINAL_MIN_SAMPLES  # shorter manifest entries are left out of both splits, as the original does
    num_workers: int = 8
    prefetch: int = 2

    RANGES = {"norm_std": POSITIVE, "num_workers": Range(0, 256), "prefetch": Range(1, 64)}

    def validate(self, where: str = "data") -> None:
        if not self.dir:
            raise ConfigError(f"{where}.dir: set the task directory (train.tsv, train.lbl, eval.tsv, ...)")
        if self.task not in TASKS:
            raise ConfigError(f"{where}.task: must be one of {TASKS}, got {self.task!r}")
        if self.target_length % 16 or self.target_length <= 0:
            raise ConfigError(f"{where}.target_length: must be a positive multiple of 16")
        if self.min_samples < 0:
            raise ConfigError(f"{where}.min_samples: must be >= 0")
        if self.prefetch < 1 or self.samples_per_epoch < 1:
            raise ConfigError(f"{where}.prefetch: prefetch and samples_per_epoch must be at least 1")


@dataclass
class FinetuneTrainSection:
    global_batch: int = 48
    max_micro_batch: int = 12
    max_steps: int = 40_000  # optimizer updates (ignored when epochs > 0)
    epochs: int = 0  # > 0: max_steps = train clips * epochs // global_batch (the SPASS recipe)
    precision: str = "bf16"
    seed: int = 1
    loss: str = "auto"  # "auto" (BCE for multilabel, CE for multiclass), "bce" or "ce"
    eval_every_steps: int = 0  # 0: only at the end (and eval_every_epochs)
    eval_every_epochs: int = 0  # the original evaluates after every epoch (1); an epoch = its clips // global_batch updates
    eval_batch: int = 32
    max_bad_steps: int = 20

    RANGES = {"epochs": AT_LEAST_0, "seed": Range(0, 2**32 - 1), "eval_every_steps": AT_LEAST_0, "max_bad_steps": AT_LEAST_1}

    def validate(self, where: str = "train") -> None:
        if self.global_batch < 1 or self.max_micro_batch < 1 or self.eval_batch < 1:
            raise ConfigError(f"{where}.global_batch: batch sizes must be positive")
        if self.precision not in ("bf16", "fp32"):
            raise ConfigError(f"{where}.precision: must be 'bf16' or 'fp32', got {self.precision!r}")
        if self.loss not in ("auto", "bce", "ce"):
            raise ConfigError(f"{where}.loss: must be 'auto', 'bce' or 'ce', got {self.loss!r}")
        if self.eval_every_steps < 0 or self.eval_every_epochs < 0:
            raise ConfigError(f"{where}.eval_every_steps: eval_every_steps and eval_every_epochs must be >= 0")
        if self.max_steps < 1 and self.epochs < 1:
            raise ConfigError(f"{where}.max_steps: set max_steps or epochs")

    @property
    def dtype(self) -> str:
        """The precision the engine runs (what ``trainer.engine.deepspeed_config`` reads)."""
        return self.precision


@dataclass
class FinetuneOptimSection(OptimConfig):
    """The pretraining optimizer section with the fine-tuning defaults (docs/method.md §9)."""

    lr: float = 5e-5
    min_lr: float = 1e-6
    warmup_steps: int = 4000
    clip_grad: float = 1e6  # the original does not clip; DeepSpeed's fp32 ZeRO checks gradients only when clipping
    # "absolute": each layer-decay group warms up from min_lr and decays to min_lr itself (the original's
    # per-group fairseq schedulers); "scaled": one multiplier for all groups, each ending at min_lr * its scale
    lr_floor: str = "absolute"
    decay_exclusions: bool = False  # no weight decay on biases and 1-D parameters: asked for, never applied by the original

    def validate(self, where: str = "optim") -> None:
        super().validate(where)
        if self.lr_floor not in LR_FLOORS:
            raise ConfigError(f"{where}.lr_floor: must be one of {LR_FLOORS}, got {self.lr_floor!r}")


@dataclass
class FinetuneCheckpointSection(CheckpointConfig):
    dir: str = "runs/finetune"
    every_steps: int = 5000


@dataclass
class TargetSection:
    """The published score this recipe should reach (docs/method.md §9)."""

    metric: str = ""  # "mAP" or "accuracy", in percent
    published: Dict[str, float] = field(default_factory=dict)  # "mean" or run name -> score
    reported: str = "best"  # the evaluation the published score is: "best" of the run's or the "last"
    source: str = ""

    def validate(self, where: str = "target") -> None:
        if self.reported not in ("best", "last"):
            raise ConfigError(f"{where}.reported: must be 'best' or 'last', got {self.reported!r}")


@dataclass
class FinetuneConfig:
    model: FinetuneModelSection = field(default_factory=FinetuneModelSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    data: FinetuneDataSection = field(default_factory=FinetuneDataSection)
    train: FinetuneTrainSection = field(default_factory=FinetuneTrainSection)
    optim: FinetuneOptimSection = field(default_factory=FinetuneOptimSection)
    checkpoint: FinetuneCheckpointSection = field(default_factory=FinetuneCheckpointSection)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    runs: List[str] = field(default_factory=list)
    target: TargetSection = field(default_factory=TargetSection)
    # "recipe": what the published runs did, every setting of deviations() refused; "custom": allowed, and logged
    fidelity: str = "recipe"

    def validate(self, where: str = "config") -> None:
        for name in ("model", "augment", "data", "train", "optim", "checkpoint", "logging", "deepspeed", "target"):
            section = getattr(self, name)
            check_ranges(section, f"{where}.{name}")
            if hasattr(section, "validate"):
                section.validate(f"{where}.{name}")
        if len(set(self.runs)) != len(self.runs):
            raise ConfigError(f"{where}.runs: listed twice")
        if self.fidelity not in FIDELITIES:
            raise ConfigError(f"{where}.fidelity: must be one of {FIDELITIES}, got {self.fidelity!r}")
        if self.fidelity == "recipe" and self.deviations():
            raise ConfigError(f"{where}.fidelity: 'recipe' runs what the published runs did, but "
                              f"{'; '.join(self.deviations())}; set fidelity to 'custom' to run it anyway")

    def deviations(self) -> List[str]:
        """The settings that depart from what the original code did in the published runs."""
        out = []
        if self.optim.lr_floor != "absolute":
            out.append(f"optim.lr_floor={self.optim.lr_floor!r} (the original: 'absolute')")
        if self.optim.decay_exclusions:
            out.append("optim.decay_exclusions=true (the original decays every parameter)")
        if self.data.min_samples != ORIGINAL_MIN_SAMPLES:
            out.append(f"data.min_samples={self.data.min_samples} (the original: {ORIGINAL_MIN_SAMPLES})")
        return out

    def for_run(self, run: str) -> "FinetuneConfig":
        """The config of one entry of ``runs``: ``{run}`` substituted, its own checkpoint directory."""
        d = self.data
        return replace(self, runs=[], data=replace(d, dir=d.dir.replace("{run}", run),
                                                   weights_file=d.weights_file.replace("{run}", run)),
                       checkpoint=replace(self.checkpoint, dir=os.path.join(self.checkpoint.dir, run)))


def load_finetune_config(path: Optional[str] = None, overrides: List[str] = ()) -> FinetuneConfig:
    """Read ``path`` (JSON), apply ``overrides``, validate; unknown keys raise ConfigError naming them."""
    return load_config(path, overrides, FinetuneConfig)


# ============================================================================== model
class Classifier(nn.Module):
    """Encoder -> CLS -> LayerNorm -> Linear: logits [B, num_classes]."""

    def __init__(self, encoder: Encoder, num_classes: int, drop_path: float = 0.0, head_norm_eps: float = 1e-6,
                 freeze_encoder: bool = False):
        super().__init__()
        self.encoder = encoder
        self.encoder.set_drop_path(drop_path)
        dim = encoder.cfg.embed_dim
        self.head_norm = nn.LayerNorm(dim, eps=head_norm_eps)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            self.encoder.requires_grad_(False)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            cls = self.encoder(fbank)[:, 0]
        return self.head(self.head_norm(cls))


def build_classifier(cfg: FinetuneModelSection, num_classes: int) -> Classifier:
    """The classifier; ``.input_settings`` is the init checkpoint's input normalisation (None
    without ``init_from``)."""
    input_settings = None
    if cfg.init_from:
        from ..released.formats import load_pretrainer

        pretrainer = load_pretrainer(cfg.init_from, **cfg.encoder)
        encoder, input_settings = pretrainer.student, pretrainer.input_settings
    else:
        encoder = Encoder(from_dict(SSLAMConfig, dict(cfg.encoder), where="model.encoder"))
    classifier = Classifier(encoder, num_classes, cfg.drop_path, cfg.head_norm_eps, cfg.freeze_encoder)
    classifier.input_settings = input_settings
    return classifier


def layer_decay_groups(model: Classifier, lr: float, weight_decay: float, layer_decay: float,
                       decay_exclusions: bool = False) -> List[Dict[str, Any]]:
    """AdamW parameter groups: block i of L at ``lr * layer_decay ** (L - i)``, the rest at ``lr``.
    Weight decay on every parameter, as the published runs had it; ``decay_exclusions``: none on
    biases and 1-D parameters. Frozen parameters are left out."""
    depth = len(model.encoder.blocks)
    groups: Dict[Tuple[float, float], Dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = 1.0
        if name.startswith("encoder.blocks."):
            scale = layer_decay ** (depth - int(name.split(".")[2]))
        wd = 0.0 if decay_exclusions and (p.ndim <= 1 or name.endswith(".bias")) else weight_decay
        group = groups.setdefault((scale, wd), {"params": [], "weight_decay": wd, "lr": lr * scale, "lr_scale": scale})
        group["params"].append(p)
    return list(groups.values())


def group_learning_rate(step: int, peak: float, floor: float, warmup: int, total: int) -> float:
    """One layer-decay group's LR after ``step`` updates, as the original's per-group fairseq cosine
    scheduler computes it: linear from ``floor`` to ``peak`` over ``warmup`` updates, then a cosine
    from ``peak`` to ``floor`` at ``total``. A group whose peak is not above the floor keeps its peak
    (the published AS-20K log: blocks 0-2 flat at 5e-5 * 0.65^12 ... 0.65^10)."""
    if peak <= floor:
        return peak
    if step < warmup:
        return floor + step * (peak - floor) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def group_lr_lambdas(groups: List[Dict[str, Any]], o: "FinetuneOptimSection", total: int) -> List[Callable[[int], float]]:
    """LambdaLR multipliers, one per group (of its initial ``lr``), for ``o.lr_floor``."""
    if o.lr_floor == "scaled":
        shared = CosineWithWarmup(o.lr, o.min_lr, o.warmup_steps, total)
        return [lambda step: shared(step)] * len(groups)

    def relative(peak: float) -> Callable[[int], float]:
        return lambda step: group_learning_rate(step, peak, o.min_lr, o.warmup_steps, total) / peak if peak > 0 else 1.0

    return [relative(o.lr * g["lr_scale"]) for g in groups]


# ============================================================================== augmentation
def _step_rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def roll_waveform(wave: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """The original's roll augmentation: a circular shift by a random offset, scaled by Beta(10, 10) + 0.5."""
    shift = int(rng.integers(len(wave)))
    return torch.roll(wave, shift) * float(rng.beta(10, 10) + 0.5)


def fbank_noise(fbank: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """The original's Speech Commands v2 noise: uniform noise times U(0, 0.1), a time shift in [-10, 10)."""
    noise = torch.from_numpy(rng.random(fbank.shape, dtype=np.float32)) * float(rng.random() / 10)
    return torch.roll(fbank + noise, int(rng.integers(-10, 10)), 0)


def mixup(fbank: torch.Tensor, target: torch.Tensor, alpha: float, prob: float,
          rng: np.random.Generator) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """Batch mixup: with probability ``prob`` draw lambda ~ Beta(alpha, alpha) and mix each clip
    and target with those of the batch reversed. Returns (fbank, target, lambda)."""
    lam = float(rng.beta(alpha, alpha)) if alpha > 0 and rng.random() < prob else 1.0
    if lam == 1.0:
        return fbank, target, lam
    return lam * fbank + (1 - lam) * fbank.flip(0), lam * target + (1 - lam) * target.flip(0), lam


def spec_mask(fbank: torch.Tensor, ratio: float, rng: np.random.Generator) -> torch.Tensor:
    """One frequency band and one time span per clip set to 0, each of a width drawn uniformly below
    ``ratio`` times the axis length at a uniform start (torchaudio's Frequency/TimeMasking with
    iid_masks). fbank: [B, 1, T, F]."""
    if ratio <= 0:
        return fbank
    B, _, T, Fq = fbank.shape
    keep = torch.ones(B, 1, T, Fq, dtype=torch.bool)
    for axis, size in ((3, Fq), (2, T)):
        width = rng.random(B) * ratio * size
        low = rng.random(B) * (size - width)
        start, stop = low.astype(np.int64), (low + width).astype(np.int64)
        pos = torch.arange(size)
        inside = (pos[None] >= torch.from_numpy(start)[:, None]) & (pos[None] < torch.from_numpy(stop)[:, None])
        keep &= ~(inside[:, None, None, :] if axis == 3 else inside[:, None, :, None])
    return fbank * keep.to(fbank.device, fbank.dtype)


# ============================================================================== data
class LabelledClips(torch.utils.data.Dataset):
    """A list of (epoch, position, index) tags -> one batch: {"fbank": [b, 1, T, 128], "target":
    [b, C] (0/1), "index": [b], "skipped": [(index, path, reason), ...], "next": (epoch, position
    after the last tag)}. Unreadable clips are left out of the batch and reported, never raised."""

    def __init__(self, manifest: _data.Manifest, labels: List[List[int]], num_classes: int, d: FinetuneDataSection,
                 augment: Optional[AugmentSection], seed: int):
        self.manifest, self.labels, self.num_classes = manifest, labels, num_classes
        self.d, self.augment, self.seed = d, augment, seed

    def __len__(self) -> int:
        return len(self.manifest)

    def clip(self, epoch: int, position: int, index: int) -> torch.Tensor:
        wave = _data.read_clip(self.manifest.path(index))
        rng = _step_rng(self.seed, 1, epoch, position, index)
        if self.augment is not None and self.augment.roll:
            wave = roll_waveform(wave, rng)
        fbank = _audio.normalise(_audio.pad_or_crop(_audio.kaldi_fbank(wave), self.d.target_length),
                                 self.d.norm_mean, self.d.norm_std)
        if self.augment is not None and self.augment.noise:
            fbank = fbank_noise(fbank, rng)
        return fbank

    def __getitem__(self, tags: List[Tuple[int, int, int]]) -> Dict[str, Any]:
        fbanks, targets, indices, skipped = [], [], [], []
        for epoch, position, index in tags:
            try:
                fbanks.append(self.clip(epoch, position, index))
            except _audio.AudioError as err:
                skipped.append((index, self.manifest.path(index), err.reason))
                continue
            target = torch.zeros(self.num_classes)
            target[self.labels[index]] = 1.0
            targets.append(target)
            indices.append(index)
        empty = torch.zeros(0, self.d.target_length, _audio.NUM_MEL_BINS)
        return {"fbank": (torch.stack(fbanks) if fbanks else empty)[:, None],
                "target": torch.stack(targets) if targets else torch.zeros(0, self.num_classes),
                "index": torch.tensor(indices, dtype=torch.long), "skipped": skipped,
                "next": (tags[-1][0], tags[-1][1] + 1)}


class _Tags(torch.utils.data.Sampler):
    def __init__(self, loader: "FinetuneLoader"):
        self.loader = loader

    def __iter__(self):
        epoch, position = self.loader.epoch, self.loader.position
        while True:
            order = self.loader.order(epoch)
            stop = len(order) if not self.loader.infinite else len(order) - len(order) % self.loader.batch_size
            for start in range(position, stop, self.loader.batch_size):
                yield [(epoch, p, int(order[p])) for p in range(start, min(start + self.loader.batch_size, stop))]
            if not self.loader.infinite:
                return
            epoch, position = epoch + 1, 0


class FinetuneLoader:
    """Batches of ``LabelledClips`` in the epoch order of rank ``rank``: a (seed, epoch) permutation,
    or with ``weights`` the balanced draw of epoch e (``BalancedSampler``), sharded over ranks.
    ``infinite``: runs on across epochs (training; a partial batch at an epoch end is dropped);
    otherwise one pass in manifest order (evaluation). ``state_dict()`` is the position just after
    the last batch handed out."""

    def __init__(self, dataset: LabelledClips, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, infinite: bool = True, weights: Optional[np.ndarray] = None,
                 samples_per_epoch: int = AS2M_SAMPLES_PER_EPOCH):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.num_workers, self.infinite = rank, world_size, num_workers, infinite
        self.weights, self.samples_per_epoch = weights, samples_per_epoch
        self.epoch = self.position = 0
        self.num_skipped = 0  # unreadable entries so far: the first LOGGED_SKIPS are logged
        self._orders: Dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            n = len(self.dataset)
            if not self.infinite:
                order = np.arange(n)[self.rank::self.world_size]
            elif self.weights is not None:
                drawn = np.array(list(BalancedSampler(self.weights, min(self.samples_per_epoch, int((self.weights > 0).sum())),
                                                      seed=self.seed, epoch=epoch)))
                order = drawn[:len(drawn) // self.world_size * self.world_size][self.rank::self.world_size]
            else:
                order = _data.epoch_order(n, self.seed, epoch, self.rank, self.world_size)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "rank": self.rank}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if state["seed"] != self.seed or state["rank"] != self.rank:
            raise ValueError(f"data position of seed {state['seed']} rank {state['rank']}, this loader has "
                             f"seed {self.seed} rank {self.rank}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def __iter__(self):
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=None, sampler=_Tags(self), num_workers=self.num_workers,
            generator=torch.Generator(),  # the worker seeds do not draw from torch's global generator
            prefetch_factor=2 if self.num_workers else None)
        failed: List[Tuple[int, str, str]] = []  # the entries skipped since the last clip read
        for batch in loader:
            skipped = batch.pop("skipped")
            for index, path, reason in skipped:
                self.num_skipped += 1
                if self.num_skipped <= _data.loader.LOGGED_SKIPS:
                    logger.warning("skipping %s (manifest %s entry %d): %s", path, self.dataset.manifest.source, index, reason)
            self.epoch, self.position = batch.pop("next")
            failed = failed + skipped if not len(batch["index"]) else []
            if len(failed) >= min(_data.loader.MAX_SKIPS_IN_A_ROW, len(self.order(self.epoch))):
                first = "; ".join(f"{path}: {reason}" for _, path, reason in failed[:3])
                raise _data.loader.NoClipsError(f"{self.dataset.manifest.source}: none of {len(failed)} entries in a row gave a clip "
                                   f"(rank {self.rank}), stopping instead of skipping for ever; first: {first}")
            if len(batch["index"]):
                yield batch
        if not self.infinite:
            self.epoch, self.position = self.epoch + 1, 0


def read_split(d: FinetuneDataSection, split: str,
               num_classes: int = 0) -> Tuple[_data.Manifest, List[List[int]], int, np.ndarray]:
    """(manifest, class indices per clip, number of classes, kept) of ``<dir>/<split>.tsv`` and
    ``.lbl`` without the entries under ``d.min_samples`` samples; kept: [manifest lines] bool."""
    manifest = _data.read_manifest(os.path.join(d.dir, f"{split}.tsv"))
    table = _data.read_label_descriptors(os.path.join(d.dir, "label_descriptors.csv"))
    labels = _data.read_labels(os.path.join(d.dir, f"{split}.lbl"), table, manifest)
    classes = num_classes or max(table.values()) + 1
    if d.task == "multiclass":
        for line, clip in enumerate(labels, start=1):
            if len(clip) != 1:
                raise ConfigError(f"{d.dir}/{split}.lbl:{line}: data.task is multiclass but the clip has {len(clip)} labels")
    kept = np.array(manifest.sizes, dtype=np.int64) >= d.min_samples
    if not kept.all():
        logger.info("%s: %d of %d entries have fewer than %d samples and are left out", manifest.source,
                    int((~kept).sum()), len(manifest), d.min_samples)
        index = np.flatnonzero(kept)
        manifest = replace(manifest, paths=[manifest.paths[i] for i in index], sizes=[manifest.sizes[i] for i in index])
        labels = [labels[i] for i in index]
    return manifest, labels, classes, kept


# ============================================================================== the run
class _Engine(nn.Module):
    """The module DeepSpeed wraps: the classifier and its loss; autocast set inside (see trainer.engine)."""

    def __init__(self, classifier: Classifier, loss: str, task: str, label_smoothing: float,
                 autocast: Optional[torch.dtype]):
        super().__init__()
        self.classifier = classifier
        self.loss, self.task, self.label_smoothing, self.autocast = loss, task, label_smoothing, autocast

    def forward(self, fbank: torch.Tensor, target: torch.Tensor, soft: bool) -> Dict[str, torch.Tensor]:
        """The loss summed over the clips (``loss_normaliser`` of the global batch divides it)."""
        with torch.autocast(fbank.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            logits = self.classifier(fbank)
        logits = torch.nan_to_num(logits.float())
        if self.loss == "bce":
            total = F.binary_cross_entropy_with_logits(logits, target, reduction="sum")
        elif soft:
            total = -(target * F.log_softmax(logits, dim=-1)).sum()
        else:
            total = F.cross_entropy(logits, target.argmax(dim=-1), label_smoothing=self.label_smoothing, reduction="sum")
        return {"loss_sum": total, "logits": logits.detach()}

    def loss_normaliser(self, target: torch.Tensor) -> torch.Tensor:
        """What the summed loss of these clips is divided by: the sum of the targets for multi-label
        BCE (the original's sample size), the number of clips otherwise."""
        if self.loss == "bce" and self.task == "multilabel":
            return target.sum(dtype=torch.float64)
        return torch.tensor(float(len(target)), dtype=torch.float64, device=target.device)


class FinetuneTrainer:
    def __init__(self, cfg: FinetuneConfig, device: torch.device):
        import deepspeed

        self.cfg, self.device = cfg, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.run_dir = cfg.checkpoint.dir
        d, t = cfg.data, cfg.train
        self.plan = plan_batch(t.global_batch, self.world, t.max_micro_batch)
        train_manifest, train_labels, self.num_classes, train_kept = read_split(d, d.train_split, cfg.model.num_classes)
        self.eval_split = read_split(d, d.eval_split, self.num_classes)[:2]
        self.max_steps = len(train_manifest) * t.epochs // t.global_batch if t.epochs > 0 else t.max_steps
        if self.max_steps < 1:
            raise ConfigError(f"train.epochs={t.epochs} of {len(train_manifest)} clips is less than one update")
        self.loss = t.loss if t.loss != "auto" else ("bce" if d.task == "multilabel" else "ce")
        resume_from = latest_checkpoint(self.run_dir) if cfg.checkpoint.resume else None
        if not cfg.checkpoint.resume and latest_checkpoint(self.run_dir):
            raise ConfigError(f"checkpoint.dir={self.run_dir} holds checkpoints and checkpoint.resume is false")

        torch.manual_seed(t.seed)  # the same head on every rank
        self.classifier = build_classifier(cfg.model, self.num_classes).to(device)
        given = self.classifier.input_settings
        if self.is_main and given is not None and (given.norm_mean, given.norm_std) != (d.norm_mean, d.norm_std):
            logger.warning("%s was pretrained on fbanks normalised with mean %.4g std %.4g (%s); this run uses "
                           "data.norm_mean=%.4g data.norm_std=%.4g", cfg.model.init_from, given.norm_mean,
                           given.norm_std, given.origin, d.norm_mean, d.norm_std)
        self.module = _Engine(self.classifier, self.loss, d.task, cfg.augment.label_smoothing,
                              torch.bfloat16 if t.precision == "bf16" else None)
        o = cfg.optim
        groups = layer_decay_groups(self.classifier, o.lr, o.weight_decay, cfg.model.layer_decay, o.decay_exclusions)
        optimizer = SkipNonFiniteAdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, group_lr_lambdas(groups, o, o.cosine_steps or self.max_steps))
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.module, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, self.plan))
        self.trainable = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        self.masters = MasterWeights(self.engine, [p for _, p in self.trainable])

        weights = None
        if d.weights_file:
            weights = read_weights(d.weights_file)
            if len(weights) != len(train_kept):
                raise ConfigError(f"{d.weights_file}: {len(weights)} weights for {len(train_kept)} train clips")
            weights = weights[train_kept]
        epoch_clips = len(train_manifest) if weights is None else min(d.samples_per_epoch, int((weights > 0).sum()))
        if epoch_clips < t.global_batch:
            raise ConfigError(
                f"{d.dir}: an epoch of {d.train_split} has {epoch_clips} clips (after leaving out entries under "
                f"data.min_samples={d.min_samples} samples{' and clips of weight 0' if weights is not None else ''}), "
                f"fewer than train.global_batch={t.global_batch}: not one update can be made")
        self.epoch_updates = epoch_clips // t.global_batch
        dataset = LabelledClips(train_manifest, train_labels, self.num_classes, d, cfg.augment, t.seed)
        self.loader = FinetuneLoader(dataset, self.plan.micro_batch, t.seed, self.rank, self.world, d.num_workers,
                                     weights=weights, samples_per_epoch=d.samples_per_epoch)
        self.data = Prefetcher(self.loader, device, depth=d.prefetch)
        torch.manual_seed(t.seed * 1_000_003 + self.rank)  # drop path draws, per rank
        self.step = 0
        self.saved_step = -1
        self.bad_total = self.bad_in_row = 0
        self.evals: List[Dict[str, float]] = []
        self.last_checkpoint: Optional[str] = None
        self.stop_signal: Optional[str] = None
        if resume_from is not None:
            with malformed_is_checkpoint_error(resume_from):
                self._resume(resume_from)
        dist.barrier()
        if self.is_main:
            remove_stale_temps(self.run_dir)
        self.log = RunLog(self.run_dir, self.step, self.max_steps, self.plan.global_batch, cfg.logging.every_steps,
                          cfg.logging.tensorboard, cfg.logging.progress_bar, self.is_main)
        self.log.message(
            f"{'resumed from ' + resume_from if resume_from else 'starting'} at step {self.step} of {self.max_steps}: "
            f"{d.task}, {self.num_classes} classes, {len(train_manifest)} train clips"
            f"{' (balanced sampling)' if weights is not None else ''}, {self.world} processes x "
            f"{self.plan.accumulation} accumulation x {self.plan.micro_batch} clips, {t.precision}, "
            f"{'linear evaluation' if cfg.model.freeze_encoder else 'fine-tuning'}")
        if cfg.deviations():
            self.log.message(f"deviations from the published recipe: {'; '.join(cfg.deviations())}", warning=True)

    @property
    def metric(self) -> str:
        return "mAP" if self.cfg.data.task == "multilabel" else "accuracy"

    def eval_due(self, step: int) -> bool:
        """Whether ``train.eval_every_steps`` or ``train.eval_every_epochs`` asks for an evaluation after ``step``."""
        t = self.cfg.train
        by_epochs = t.eval_every_epochs * self.epoch_updates
        return bool(t.eval_every_steps and step % t.eval_every_steps == 0 or by_epochs and step % by_epochs == 0)

    # ------------------------------------------------------------------------------ one update
    def train_step(self) -> Dict[str, float]:
        """One update over the global batch, as the original's one forward of the whole batch: one
        mixup lambda for all of it (each clip mixed with the reversed batch of its rank: the batch is
        a random draw, so this pairs clips as the whole batch reversed would, without moving fbanks
        between ranks), masks drawn per clip, and the loss of every micro batch divided by the
        normaliser of the global batch."""
        a, t = self.cfg.augment, self.cfg.train
        lr = max(self.scheduler.get_last_lr())
        start = time.perf_counter()
        batches = [self.data.next() for _ in range(self.plan.accumulation)]
        data_s = time.perf_counter() - start
        sizes = [len(b["target"]) for b in batches]
        fbank, target, lam = mixup(torch.cat([b["fbank"] for b in batches]), torch.cat([b["target"] for b in batches]),
                                   a.mixup, a.mixup_prob, _step_rng(t.seed, 2, self.step))
        fbank = spec_mask(fbank, a.mask_ratio, _step_rng(t.seed, 3, self.rank, self.step))
        normaliser = self.module.loss_normaliser(target)
        dist.all_reduce(normaliser)
        # DeepSpeed divides the gradient by the accumulation steps and averages it over the ranks
        scale = self.world * self.plan.accumulation / float(normaliser.clamp_min(1e-8))
        loss_sum, norm = 0.0, None
        for fb, tg in zip(fbank.split(sizes), target.split(sizes)):
            out = self.engine(fb, tg, soft=a.mixup > 0)
            self.engine.backward(out["loss_sum"] * scale)
            if self.engine.is_gradient_accumulation_boundary():
                norm = gradient_norm(p for _, p in self.trainable)
            self.engine.step()
            loss_sum += float(out["loss_sum"].detach())
        sums = torch.tensor([loss_sum, float(not self.engine.was_step_applied()), float(self.stop_signal is not None)],
                            dtype=torch.float64)
        dist.all_reduce(sums)
        m = {"loss": float(sums[0]) / float(normaliser.clamp_min(1e-8)), "mixup_lambda": lam,
             "skipped": float(sums[1] > 0), "stop": float(sums[2] > 0), "data_s": data_s, "lr": lr}
        if not m["skipped"]:
            self.step += 1
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = grad_norm if grad_norm is not None else norm
        m["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        return m

    # ------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """The metric on the eval split (rank 0 computes it; the others wait)."""
        result: Dict[str, float] = {}
        if self.is_main:
            manifest, labels = self.eval_split
            dataset = LabelledClips(manifest, labels, self.num_classes, self.cfg.data, None, self.cfg.train.seed)
            loader = FinetuneLoader(dataset, self.cfg.train.eval_batch, self.cfg.train.seed,
                                    num_workers=self.cfg.data.num_workers, infinite=False)
            was_training = self.classifier.training
            self.classifier.eval()
            scores, targets = [], []
            dtype = torch.bfloat16 if self.cfg.train.precision == "bf16" else None
            for batch in loader:
                with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                    logits = self.classifier(batch["fbank"].to(self.device)).float()
                scores.append(torch.sigmoid(logits) if self.cfg.data.task == "multilabel" else torch.softmax(logits, -1))
                targets.append(batch["target"])
            self.classifier.train(was_training)
            s, y = torch.cat(scores).cpu(), torch.cat(targets)
            value = mean_average_precision(s, y) if self.cfg.data.task == "multilabel" else accuracy(s, y.argmax(-1))
            result = {"step": self.step, f"eval_{self.metric}": 100.0 * value, "eval_clips": len(y)}
            self.evals.append(result)
            if self.log.jsonl is not None:
                self.log.jsonl.write(json.dumps(result) + "\n")
                self.log.jsonl.flush()
            if self.log.tb is not None:
                self.log.tb.add_scalar(f"eval/{self.metric}", result[f"eval_{self.metric}"], self.step)
            self.log.message(f"step {self.step}: eval {self.metric} {result[f'eval_{self.metric}']:.2f} on {len(y)} clips")
        dist.barrier()
        return result

    # ------------------------------------------------------------------------------ checkpoints
    def save(self) -> str:
        tmp = begin_save(self.run_dir, self.step, self.is_main)
        self.engine.save_checkpoint(os.path.join(tmp, "deepspeed"), tag="engine", save_latest=False)
        masters = self.masters.gather()
        atomic_save({"rng": rng_state(torch.Generator()), "data": self.data.state_dict()},
                    os.path.join(tmp, f"rank_{self.rank}.pt"))
        if self.is_main:
            state = {f"classifier.{k}": v for k, v in self.classifier.state_dict().items()}
            for (name, _), master in zip(self.trainable, masters):
                state[name] = master.float()
            class_names = _data.read_class_names(os.path.join(self.cfg.data.dir, "label_descriptors.csv"), self.num_classes)
            atomic_save({"format": FINETUNE_FORMAT, "version": 1, "config": to_dict(self.cfg),
                         "encoder_config": to_dict(self.classifier.encoder.cfg), "class_names": class_names,
                         "model": {k[len("classifier."):]: v.detach().cpu() for k, v in state.items()},
                         "num_classes": self.num_classes, "step": self.step, "world_size": self.world,
                         "bad_total": self.bad_total, "evals": json.dumps(self.evals)}, os.path.join(tmp, "train.pt"))
        self.last_checkpoint = finish_save(tmp, self.run_dir, self.step, self.cfg.checkpoint.keep_last, self.is_main)
        self.saved_step = self.step
        return self.last_checkpoint

    def _resume(self, path: str) -> None:
        files = read_resume_state(path, self.rank, fmt=FINETUNE_FORMAT)
        state, own = files["train"], files["rank"]
        if state["world_size"] != self.world:
            raise ConfigError(f"{path} was written by {state['world_size']} processes, this run has {self.world}")
        load_engine_state(self.engine, path, files["listing"])
        self.step = self.saved_step = state["step"]
        self.bad_total = state["bad_total"]
        self.evals = json.loads(state["evals"])
        restore_rng_state(own["rng"], torch.Generator())
        self.data.load_state_dict(own["data"])
        self.last_checkpoint = path

    # ------------------------------------------------------------------------------ the run
    def _guard(self, m: Dict[str, float]) -> None:
        if m["skipped"] or not math.isfinite(m["loss"]):
            self.bad_total += 1
            self.bad_in_row += 1
            self.log.message(f"step {self.step + 1}: non-finite loss or gradient, update skipped "
                             f"({self.bad_in_row} in a row)", warning=True)
            if self.bad_in_row >= self.cfg.train.max_bad_steps:
                raise TrainingStopped(f"{self.bad_in_row} non-finite steps in a row at step {self.step}; lower optim.lr")
        else:
            self.bad_in_row = 0

    def run(self) -> int:
        cfg = self.cfg
        reason, status, finished = f"reached {self.max_steps} updates", 0, False
        try:
            with run_session(self):
                while self.step < self.max_steps:
                    start = time.perf_counter()
                    m = self.train_step()
                    data_s = m.pop("data_s")
                    stop = m.pop("stop")
                    self._guard(m)
                    m["bad_steps"] = self.bad_total
                    self.log.step(self.step, m, data_s, time.perf_counter() - start - data_s)
                    if self.eval_due(self.step) and self.step < self.max_steps and not m["skipped"]:
                        self.evaluate()
                    if stop:
                        reason = f"{self.stop_signal or 'a signal to another rank'} received at step {self.step}"
                        break
                    if self.step % cfg.checkpoint.every_steps == 0 and self.step != self.saved_step:
                        self.save()
                finished = self.step >= self.max_steps
        except (TrainingStopped, _data.loader.NoClipsError) as e:
            reason, status = str(e), 2
            logger.error(reason)
        if finished and (not self.evals or self.evals[-1]["step"] != self.step):
            self.evaluate()
        if status == 0 and self.step != self.saved_step:
            self.save()
        if finished and self.is_main:
            self._write_final()
        self.log.message(self.log.summary(self.step, self.bad_total, 0, self.last_checkpoint, reason))
        self.log.close()
        return status

    def _write_final(self) -> None:
        key = f"eval_{self.metric}"
        best = max(self.evals, key=lambda e: e[key])
        reported = self.cfg.target.reported
        final = {"metric": self.metric, "last": self.evals[-1][key], "best": best[key], "best_step": best["step"],
                 "reported": reported, "value": best[key] if reported == "best" else self.evals[-1][key],
                 "step": self.step, "evals": self.evals, "checkpoint": self.last_checkpoint}
        with open(os.path.join(self.run_dir, "final.json"), "w", encoding="utf-8") as f:
            json.dump(final, f, indent=1)


def read_final(run_dir: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(run_dir, "final.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def run_finetune(cfg: FinetuneConfig, device: torch.device) -> int:
    """One run, or each entry of ``cfg.runs`` in turn; then the summary against the published scores."""
    if not cfg.runs:
        return FinetuneTrainer(cfg, device).run()
    results: Dict[str, Any] = {}
    for run in cfg.runs:
        one = cfg.for_run(run)
        status = FinetuneTrainer(one, device).run()
        if status != 0:
            return status
        results[run] = read_final(one.checkpoint.dir)
    if dist.get_rank() == 0 and all(results.values()):
        summary = {"metric": results[cfg.runs[0]]["metric"], "reported": cfg.target.reported,
                   "runs": {k: v["value"] for k, v in results.items()},
                   "mean": float(np.mean([r["value"] for r in results.values()])),
                   "mean_last": float(np.mean([r["last"] for r in results.values()])),
                   "mean_best": float(np.mean([r["best"] for r in results.values()])),
                   "published": cfg.target.published, "source": cfg.target.source}
        with open(os.path.join(cfg.checkpoint.dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
        logger.info("summary: %s", json.dumps(summary))
    return 0
