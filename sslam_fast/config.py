"""Configuration as data: JSON validated into dataclasses, unknown keys are errors that name them.

Every number must be finite, and each dataclass's ``RANGES`` ({key: Range}) bound its values: a
value outside is an error naming the key and the source before anything uses it."""
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, fields
from typing import Any, Dict, NamedTuple, Optional, Tuple


class ConfigError(ValueError):
    """A configuration value or key that cannot be accepted; the message names the key."""


class Range(NamedTuple):
    """The values a key accepts: from lo to hi (None: unbounded), each end closed unless said open."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value) -> bool:
        above = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        below = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
        return above and below

    def __str__(self) -> str:
        lo = "-inf" if self.lo is None else f"{self.lo:g}" if isinstance(self.lo, float) else str(self.lo)
        hi = "inf" if self.hi is None else f"{self.hi:g}" if isinstance(self.hi, float) else str(self.hi)
        return f"{'(' if self.lo_open or self.lo is None else '['}{lo}, {hi}{')' if self.hi_open or self.hi is None else ']'}"


AT_LEAST_0, AT_LEAST_1, POSITIVE, UNIT, FRACTION = Range(0), Range(1), Range(0, lo_open=True), Range(0, 1), Range(0, 1, hi_open=True)
EPS = Range(0, 1, lo_open=True)


def check_ranges(obj, where: str) -> None:
    """Raise ConfigError for the first value of ``obj`` outside its class's ``RANGES``."""
    for key, allowed in getattr(type(obj), "RANGES", {}).items():
        value = getattr(obj, key)
        for v in value if isinstance(value, tuple) else (value,):
            if v is not None and v not in allowed:
                raise ConfigError(f"{where}.{key}: {value!r} is outside {allowed}")


def _convert(tp, value, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where)
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin in (list, typing.List):
        return [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, typing.Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {type(value).__name__}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls, data: Dict[str, Any], where: str = "config"):
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    obj = cls(**kwargs)
    check_ranges(obj, where)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(where)
    return obj


def to_dict(obj) -> Dict[str, Any]:
    """Plain JSON-ready dict of a config dataclass."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


@dataclass
class SSLAMConfig:
    """The pretraining model: encoder, masking, decoder, teacher targets and the losses.

    Defaults are the released ViT-B recipe (docs/method.md §3-7); ``stage`` 1 is EAT, 2 is SSLAM.
    """

    stage: int = 1
    # encoder (docs/method.md §3)
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 16
    num_mel_bins: int = 128
    max_time_patches: int = 768
    norm_eps: float = 1e-6
    attention: str = "auto"  # auto: flash-attn if it imports, else SDPA; "sdpa"; "eager" (reference)
    # masking (docs/method.md §4)
    mask_prob: float = 0.8
    mask_length: int = 5
    mask_prob_adjust: float = 0.07
    clone_batch: int = 16
    # decoder (docs/method.md §6)
    decoder_layers: int = 6
    decoder_kernel: int = 3
    decoder_groups: int = 16
    decoder_norm_eps: float = 1e-5
    mask_noise_std: float = 0.01
    # targets (docs/method.md §5)
    average_top_k_layers: int = 12
    instance_norm_eps: float = 1e-5
    target_norm_eps: float = 1e-5
    # losses (docs/method.md §6, 7); loss_scale None means 1 / sqrt(embed_dim)
    loss_scale: Optional[float] = None
    cls_loss_weight: float = 1.0
    patch_loss_weight: float = 1.0
    srl_loss_weight: float = 2.0
    # partial mixtures (docs/method.md §7), in frames
    mix_window: int = 240
    mix_w1_max: int = 496
    mix_w2_max: int = 782
    mix_step: int = 16
    # EMA teacher (docs/method.md §5)
    ema_decay: float = 0.9998
    ema_end_decay: float = 0.99999
    ema_anneal_end_step: int = 100_000

    RANGES = {
        "embed_dim": Range(1, 16384), "depth": Range(1, 256), "num_heads": Range(1, 1024), "mlp_ratio": Range(0, 64, lo_open=True),
        "patch_size": Range(1, 1024), "num_mel_bins": Range(1, 1024), "max_time_patches": Range(1, 65536), "norm_eps": EPS,
        "mask_prob": FRACTION, "mask_length": Range(1, 65536), "mask_prob_adjust": UNIT, "clone_batch": Range(1, 1024),
        "decoder_layers": Range(0, 64), "decoder_kernel": Range(1, 63), "decoder_groups": Range(1, 16384), "decoder_norm_eps": EPS,
        "mask_noise_std": AT_LEAST_0, "average_top_k_layers": AT_LEAST_1, "instance_norm_eps": EPS, "target_norm_eps": EPS,
        "loss_scale": POSITIVE, "cls_loss_weight": AT_LEAST_0, "patch_loss_weight": AT_LEAST_0, "srl_loss_weight": AT_LEAST_0,
        "mix_window": AT_LEAST_1, "mix_w1_max": AT_LEAST_0, "mix_w2_max": AT_LEAST_0, "mix_step": AT_LEAST_1,
        "ema_decay": UNIT, "ema_end_decay": UNIT, "ema_anneal_end_step": AT_LEAST_0,
    }

    def validate(self, where: str = "model") -> None:
        def bad(key, why):
            raise ConfigError(f"{where}.{key}: {why}")

        check_ranges(self, where)  # first: a zero num_heads or patch_size would divide by zero below
        if self.stage not in (1, 2):
            bad("stage", f"must be 1 (EAT) or 2 (SSLAM), got {self.stage}")
        if self.embed_dim % self.num_heads:
            bad("num_heads", f"{self.num_heads} does not divide embed_dim {self.embed_dim}")
        if self.embed_dim % self.decoder_groups:
            bad("decoder_groups", f"{self.decoder_groups} does not divide embed_dim {self.embed_dim}")
        if self.num_mel_bins % self.patch_size:
            bad("num_mel_bins", f"must be a multiple of patch_size {self.patch_size}")
        if not 1 <= self.average_top_k_layers <= self.depth:
            bad("average_top_k_layers", f"must be in [1, depth={self.depth}]")
        if self.attention not in ("auto", "sdpa", "flash", "eager"):
            bad("attention", f"must be auto, sdpa, flash or eager, got {self.attention!r}")
        if self.clone_batch < 1:
            bad("clone_batch", "must be at least 1")
        if self.mix_window % self.patch_size or self.mix_step % self.patch_size:
            bad("mix_window", "the window and its step must be multiples of patch_size")

    @property
    def freq_patches(self) -> int:
        return self.num_mel_bins // self.patch_size

    @classmethod
    def large(cls, **overrides) -> "SSLAMConfig":
        values = dict(embed_dim=1024, depth=24, num_heads=16, average_top_k_layers=24)
        values.update(overrides)
        return cls(**values)
