"""Checkpoint formats and their key mappings (the one place that knows them).

- Original pretraining (fairseq SSLAM / EAT, ``data2vec_multi``): ``{"cfg": {...}, "model": state}``;
  the student's weights sit under ``modality_encoders.IMAGE.*`` and ``blocks.*``, the CNN decoder
  under ``modality_encoders.IMAGE.decoder.*``, and the EMA teacher's fp32 weights in
  ``model["_ema"]`` with the encoder's names.
- Original fine-tuned (``mae_image_classification``): the pretraining encoder under ``model.``
  (no decoder, no ``_ema``), then ``fc_norm.*`` (LayerNorm, eps 1e-6, when ``use_fc_norm``) and
  ``head.*`` (Linear); ``cfg["model"]`` holds ``num_classes``, ``prediction_mode`` and the
  pretraining config in ``pretrained_model_args``.
- Hugging Face EAT folders (``config.json`` + ``model.safetensors``, the hub's ``modeling_eat.py``):
  ``model.local_encoder.proj.*``, ``model.extra_tokens``, ``model.fixed_positional_encoder.positions``,
  ``model.pre_norm.*``, ``model.blocks.*`` and, fine-tuned, ``model.fc_norm.*`` (eps 1e-5 there)
  and ``model.head.*``. Only the JSON and the tensors are read; no code from the folder runs.
- This project's: ``save_pretrainer`` files, pretraining and fine-tuning run checkpoints (a
  ``step_*`` directory or its ``train.pt``; a run directory stands for its newest), and the
  exported safetensors.

Every checkpoint carries the input normalisation its model was trained with (``InputSettings``:
``norm_mean``, ``norm_std``, ``target_length``): run checkpoints in their config's ``data``
section, our files and exports beside the weights; original checkpoints hold none, so they get
the AudioSet values the original code hard-codes, and say so.

Loading needs neither fairseq nor omegaconf; every torch file goes through ``safe_load``.
"""
import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..config import ConfigError, SSLAMConfig, from_dict, to_dict
from ..data.audio import NORM_MEAN, NORM_STD, TARGET_LENGTH
from ..model import sincos_table
from ..pretrainer import SSLAMPretrainer
from ..serialization import CheckpointError, atomic_save, load_bytes, names_the_file, safe_load
from ..trainer.checkpoints import CHECKSUMS, TRAIN_FORMAT, checked_listing, latest_checkpoint, read_checked

logger = logging.getLogger("sslam_fast.released")
OWN_FORMAT = "sslam-fast/pretrainer"
FINETUNE_FORMAT = "sslam-fast/finetune"


# --------------------------------------------------------------------------- what a path names
@dataclass(frozen=True)
class InputSettings:
    """How the model's input was made: fbank frames normalised as (x - norm_mean) / (2 * norm_std)
    (docs/method.md §2), clips of ``target_length`` frames; ``origin`` says where the values come from."""

    norm_mean: float = NORM_MEAN
    norm_std: float = NORM_STD
    target_length: int = TARGET_LENGTH
    origin: str = "AudioSet statistics: the checkpoint stores none (original checkpoints use these)"

    def to_dict(self) -> Dict[str, Any]:
        return {"norm_mean": self.norm_mean, "norm_std": self.norm_std, "target_length": self.target_length}

    @classmethod
    def from_dict(cls, values: Optional[Dict[str, Any]], origin: str) -> "InputSettings":
        if not values:
            return cls()
        if not isinstance(values, dict):
            raise ConfigError(f"input settings {origin}: expected an object, got {type(values).__name__}")
        settings = cls(values.get("norm_mean", NORM_MEAN), values.get("norm_std", NORM_STD),
                       values.get("target_length", TARGET_LENGTH), origin)
        for key, value in settings.to_dict().items():
            if isinstance(value, bool) or not isinstance(value, int if key == "target_length" else (int, float)):
                raise ConfigError(f"input settings {origin}: {key} must be a number, got {value!r}")
        if not (math.isfinite(settings.norm_mean) and math.isfinite(settings.norm_std) and settings.norm_std > 0):
            raise ConfigError(f"input settings {origin}: norm_mean must be finite and norm_std finite and > 0, "
                              f"got {settings.norm_mean!r}, {settings.norm_std!r}")
        if not 16 <= settings.target_length <= 1 << 20:
            raise ConfigError(f"input settings {origin}: target_length {settings.target_length} is outside [16, 1048576]")
        return dataclasses.replace(settings, norm_mean=float(settings.norm_mean), norm_std=float(settings.norm_std))

    def with_overrides(self, norm_mean: Optional[float] = None, norm_std: Optional[float] = None) -> "InputSettings":
        """These settings with the normalisation replaced where a value is given (the override flags)."""
        if norm_mean is None and norm_std is None:
            return self
        return InputSettings.from_dict({"norm_mean": self.norm_mean if norm_mean is None else norm_mean,
                                        "norm_std": self.norm_std if norm_std is None else norm_std,
                                        "target_length": self.target_length},
                                       "given by the caller, overriding the checkpoint's")

    def describe(self) -> str:
        return (f"input normalisation mean {self.norm_mean:.4g} std {self.norm_std:.4g}, "
                f"{self.target_length}-frame windows ({self.origin})")


def resolve_checkpoint(path) -> Tuple[str, str]:
    """(the file or folder to read, what it is) for any form a user may name: a run's ``step_*``
    directory or its ``train.pt``, a run directory (its newest checkpoint), an original or own
    ``.pt``, a ``.safetensors`` file, a Hugging Face style folder or its ``model.safetensors``."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "train.pt")):
            return os.path.join(path, "train.pt"), "run checkpoint directory"
        if os.path.isfile(os.path.join(path, "config.json")):
            return path, "Hugging Face style folder"
        newest = latest_checkpoint(path)
        if newest is not None and os.path.isfile(os.path.join(newest, "train.pt")):
            return os.path.join(newest, "train.pt"), f"run directory, its newest checkpoint {os.path.basename(newest)}"
        raise CheckpointError(f"{path}: a folder that is neither a run checkpoint (step_*/ with train.pt), a run "
                              "directory with step_* checkpoints, nor a Hugging Face model folder (config.json)")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: not a regular file")
    if path.endswith(".safetensors"):
        folder = os.path.dirname(path) or "."
        if os.path.basename(path) == "model.safetensors" and os.path.isfile(os.path.join(folder, "config.json")):
            return folder, "Hugging Face style folder"
        return path, "safetensors file"
    return path, "torch file"


def _read_torch(file: str, map_location="cpu") -> Any:
    """A torch file through ``safe_load``; a run checkpoint's ``train.pt`` only once its directory
    passes the checks a resume makes (regular files only, each listed in ``checksums.json``, the
    digest of the file read), and unpickled from the very bytes checked."""
    directory = os.path.dirname(file) or "."
    if os.path.basename(file) == "train.pt" and os.path.lexists(os.path.join(directory, CHECKSUMS)):
        return load_bytes(read_checked(directory, "train.pt", checked_listing(directory)), file, map_location)
    return safe_load(file, map_location)


_ENC = "modality_encoders.IMAGE."
_POSITIONS = _ENC + "fixed_positional_encoder.positions"


# --------------------------------------------------------------------------- fairseq layout
def _fairseq_config(path: str, cfg: Dict[str, Any], overrides: Dict[str, Any]) -> SSLAMConfig:
    model = cfg.get("model") if isinstance(cfg, dict) else None
    if not isinstance(model, dict):
        raise CheckpointError(f"{path}: cfg['model'] is missing; not a fairseq data2vec/EAT checkpoint")
    image = (model.get("modalities") or {}).get("image") or {}
    decoder = image.get("decoder") or {}
    embed = model.get("embed_dim", 768)
    if decoder.get("decoder_dim", embed) != embed:
        raise CheckpointError(f"{path}: decoder_dim {decoder.get('decoder_dim')} != embed_dim {embed} is not supported")
    values = {
        "embed_dim": embed,
        "depth": model.get("depth"),
        "num_heads": model.get("num_heads"),
        "mlp_ratio": model.get("mlp_ratio"),
        "norm_eps": model.get("norm_eps"),
        "average_top_k_layers": model.get("average_top_k_layers"),
        "clone_batch": model.get("clone_batch"),
        "loss_scale": model.get("loss_scale"),
        "cls_loss_weight": model.get("cls_loss"),
        "ema_decay": model.get("ema_decay"),
        "ema_end_decay": model.get("ema_end_decay"),
        "ema_anneal_end_step": model.get("ema_anneal_end_step"),
        "patch_size": image.get("patch_size"),
        "max_time_patches": image.get("max_length"),
        "mask_prob": image.get("mask_prob"),
        "mask_length": image.get("mask_length"),
        "mask_prob_adjust": image.get("mask_prob_adjust"),
        "mask_noise_std": image.get("mask_noise_std"),
        "decoder_layers": decoder.get("decoder_layers"),
        "decoder_kernel": decoder.get("decoder_kernel"),
        "decoder_groups": decoder.get("decoder_groups"),
    }
    values = {k: v for k, v in values.items() if v is not None}
    if isinstance(values.get("ema_anneal_end_step"), str):  # an unresolved interpolation
        del values["ema_anneal_end_step"]
    values.update(overrides)
    return from_dict(SSLAMConfig, values, where=f"{path}: model")


def _fairseq_encoder_key(key: str) -> Optional[str]:
    """Original encoder parameter name -> ours (None for entries with no counterpart)."""
    if key.startswith("blocks."):
        return key
    renames = {
        _ENC + "local_encoder.proj.weight": "patch_embed.weight",
        _ENC + "local_encoder.proj.bias": "patch_embed.bias",
        _ENC + "extra_tokens": "cls_token",
        _ENC + "context_encoder.norm.weight": "norm.weight",
        _ENC + "context_encoder.norm.bias": "norm.bias",
    }
    return renames.get(key)


def _fairseq_decoder_key(key: str) -> Optional[str]:
    prefix = _ENC + "decoder."
    if not key.startswith(prefix):
        return None
    rest = key[len(prefix):]
    parts = rest.split(".")
    if parts[0] == "blocks" and len(parts) == 4 and parts[2] == "0":
        return f"convs.{parts[1]}.{parts[3]}"
    if parts[0] == "proj":
        return rest
    return None


def _check_positions(path: str, table: torch.Tensor, encoder: torch.nn.Module) -> None:
    ours = encoder.pos_table
    theirs = table.reshape(-1, table.shape[-1]).float()
    n = min(len(ours), len(theirs))
    if theirs.shape[-1] != ours.shape[-1] or not torch.allclose(theirs[:n], ours[:n], atol=1e-4):
        raise CheckpointError(f"{path}: the stored positional table differs from the 2-D sin-cos table")


def _fairseq_parts(path: str, state: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Split an original ``model`` state dict (keys under ``prefix``) into our student, decoder,
    teacher (fp32, from ``_ema``) and the stored positional table; tensors keep their dtypes."""
    state = dict(state)
    ema = state.pop(prefix + "_ema", None)
    student, decoder, positions = {}, {}, None
    for key, value in state.items():
        if not key.startswith(prefix):
            raise CheckpointError(f"{path}: unexpected key model[{key!r}] in a fairseq SSLAM/EAT checkpoint")
        inner = key[len(prefix):]
        if inner == _POSITIONS:
            positions = value
        elif (name := _fairseq_encoder_key(inner)) is not None:
            student[name] = value
        elif (name := _fairseq_decoder_key(inner)) is not None:
            decoder[name] = value
        else:
            raise CheckpointError(f"{path}: unexpected key model[{key!r}] in a fairseq SSLAM/EAT checkpoint")
    teacher = None
    if ema is not None:
        teacher = {}
        for key, value in ema.items():
            if key == _POSITIONS:
                continue
            name = _fairseq_encoder_key(key)
            if name is None:
                raise CheckpointError(f"{path}: unexpected key model['_ema'][{key!r}]")
            teacher[name] = value.float()
    return {"student": student, "decoder": decoder or None, "teacher": teacher, "positions": positions}


def _load_fairseq(path: str, ckpt: Dict[str, Any], overrides: Dict[str, Any]) -> SSLAMPretrainer:
    cfg = _fairseq_config(path, ckpt.get("cfg") or {}, overrides)
    model = SSLAMPretrainer(cfg)
    parts = _fairseq_parts(path, ckpt["model"])
    if parts["positions"] is not None:
        _check_positions(path, parts["positions"], model.student)
    _load_strict(path, "model", model.student, parts["student"])
    if parts["decoder"]:
        _load_strict(path, "model (decoder)", model.decoder, parts["decoder"])
    if parts["teacher"] is not None:
        _load_strict(path, "model['_ema']", model.teacher, parts["teacher"])
    else:
        model.teacher.load_state_dict(model.student.state_dict())
    return model


def _load_strict(path: str, where: str, module: torch.nn.Module, state: Dict[str, torch.Tensor]) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise CheckpointError(f"{path}: {where} lacks {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    for key, value in state.items():
        if key not in own:
            raise CheckpointError(f"{path}: {where} has unexpected key {key!r}")
        if own[key].shape != value.shape:
            raise CheckpointError(f"{path}: {where}[{key!r}] has shape {list(value.shape)}, expected {list(own[key].shape)}")
        if own[key].is_floating_point() and not value.is_floating_point():  # fp16/bf16 widen exactly; integers are not weights
            raise CheckpointError(f"{path}: {where}[{key!r}] is {value.dtype}, expected floating-point weights")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


# --------------------------------------------------------------------------- public
@names_the_file
def load_pretrainer(path, map_location="cpu", **overrides) -> SSLAMPretrainer:
    """Read any checkpoint (``resolve_checkpoint``) into an ``SSLAMPretrainer``.

    Pretraining checkpoints give student, decoder and teacher as stored (the original fairseq
    format, ``save_pretrainer`` files, run checkpoints, exports). Where a file has no teacher (a
    fine-tuned model, a Hugging Face folder of the hub) the teacher starts as a copy of the student;
    where it has no decoder, the decoder keeps its fresh initialisation (logged). ``overrides``
    replace model config values, e.g. ``stage=2`` to continue an EAT (stage-1) checkpoint as SSLAM.
    ``model.input_settings`` is the checkpoint's ``InputSettings``.
    """
    file, kind = resolve_checkpoint(path)
    if os.path.isdir(file) or file.endswith(".safetensors"):
        return _pretrainer_from_weights(read_weights(file), overrides)
    ckpt = _read_torch(file, map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt and "student" not in ckpt:
        raise CheckpointError(f"{file}: not a pretraining checkpoint (no 'model' or 'student' entry)")
    fmt = ckpt.get("format")
    if fmt == OWN_FORMAT:
        model = SSLAMPretrainer(_own_config(file, ckpt["config"], overrides))
        for part in ("student", "decoder", "teacher"):
            _load_strict(file, part, getattr(model, part), ckpt[part])
    elif fmt == TRAIN_FORMAT:
        config = ckpt.get("config") or {}
        model = SSLAMPretrainer(_own_config(file, config.get("model", {}), overrides))
        _load_strict(file, "model", model, ckpt["model"])
    elif fmt == FINETUNE_FORMAT or _is_finetuned(ckpt):
        return _pretrainer_from_weights(_weights_of(file, kind, ckpt), overrides)
    else:
        model = _load_fairseq(file, ckpt, overrides)
    model.input_settings = _input_of(ckpt)
    return model


def _pretrainer_from_weights(weights: "ReleasedWeights", overrides: Dict[str, Any]) -> SSLAMPretrainer:
    config = from_dict(SSLAMConfig, {**to_dict(weights.config), **overrides}, where=f"{weights.path}: config")
    model = SSLAMPretrainer(config)
    if weights.positions is not None:
        _check_positions(weights.path, weights.positions, model.student)
    _load_strict(weights.path, "student", model.student, weights.student)
    _load_strict(weights.path, "teacher", model.teacher, weights.teacher or weights.student)
    if weights.decoder:
        _load_strict(weights.path, "decoder", model.decoder, weights.decoder)
    else:
        logger.warning("%s (%s) holds no decoder: the decoder starts freshly initialised", weights.path, weights.found)
    model.input_settings = weights.input
    return model


# Model keys of earlier versions that now live outside the model config (ignored when read).
LEGACY_MODEL_KEYS = ("use_kernels",)


def _own_config(path: str, values: Dict[str, Any], overrides: Dict[str, Any]) -> SSLAMConfig:
    values = {k: v for k, v in values.items() if k not in LEGACY_MODEL_KEYS}
    return from_dict(SSLAMConfig, {**values, **overrides}, where=f"{path}: config")


def save_pretrainer(model: SSLAMPretrainer, path: str, input_settings: Optional[InputSettings] = None) -> None:
    """Write student, decoder, teacher, config and the input normalisation (``input_settings``,
    else the model's ``input_settings``, else AudioSet's) in this project's format (atomically)."""
    settings = input_settings or getattr(model, "input_settings", None) or InputSettings()
    atomic_save(
        {
            "format": OWN_FORMAT,
            "version": 1,
            "config": to_dict(model.cfg),
            "input": settings.to_dict(),
            "student": model.student.state_dict(),
            "decoder": model.decoder.state_dict(),
            "teacher": model.teacher.state_dict(),
        },
        path,
    )


# --------------------------------------------------------------------------- released weights
SAFETENSORS_FORMAT = "sslam-fast/released"
POOLINGS = {1: "mean", 2: "cls", 3: "lin_softmax"}  # the original PredictionMode values (enum auto())
_POOLING_NAMES = {"MEAN_POOLING": "mean", "CLS_TOKEN": "cls", "LIN_SOFTMAX": "lin_softmax"}


@dataclass
class HeadWeights:
    """A fine-tuned classification head: optional ``fc_norm`` LayerNorm, then ``head`` Linear."""

    weight: torch.Tensor
    bias: torch.Tensor
    norm_weight: Optional[torch.Tensor] = None
    norm_bias: Optional[torch.Tensor] = None
    norm_eps: float = 1e-6
    pooling: str = "cls"  # "cls" (CLS token), "mean" (mean of the patch tokens) or "lin_softmax"
    labels: Optional[List[str]] = None  # class i's name; None: AudioSet's for 527 classes, else "class i"
    task: str = "multilabel"  # "multilabel": a sigmoid per class; "multiclass": one softmax (single-label fine-tunes)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]


@dataclass
class ReleasedWeights:
    """Everything a released checkpoint holds, in this project's key names and the stored dtypes.

    ``teacher`` and ``decoder`` exist for pretraining checkpoints, ``head`` for fine-tuned ones;
    ``positions`` is the stored fixed positional table ([1, N, D]) when the file has one;
    ``input`` the input normalisation; ``path`` the file read and ``found`` what it is, in words.
    """

    config: SSLAMConfig
    student: Dict[str, torch.Tensor]
    source: str
    teacher: Optional[Dict[str, torch.Tensor]] = None
    decoder: Optional[Dict[str, torch.Tensor]] = None
    positions: Optional[torch.Tensor] = None
    head: Optional[HeadWeights] = None
    input: InputSettings = InputSettings()
    path: str = ""
    found: str = ""

    def positions_table(self) -> torch.Tensor:
        if self.positions is not None:
            return self.positions
        c = self.config
        return sincos_table(c.embed_dim, c.max_time_patches, c.freq_patches)[None]


def _pooling(path: str, mode: Any) -> str:
    """The original ``prediction_mode``: an enum (a placeholder holding its value once unpickled),
    its name as a string ("PredictionMode.CLS_TOKEN" or "CLS_TOKEN"), or its integer value."""
    args = getattr(mode, "args", None)
    value = args[0] if args else mode
    if isinstance(value, str):
        name = value.split(".")[-1]
        if name in _POOLING_NAMES:
            return _POOLING_NAMES[name]
    elif isinstance(value, int) and value in POOLINGS:
        return POOLINGS[value]
    raise CheckpointError(f"{path}: cfg['model']['prediction_mode'] {mode!r} is not a known prediction mode")


def finetuned_config(path: str, cfg: Dict[str, Any]) -> Tuple[SSLAMConfig, Dict[str, Any]]:
    """(encoder config, head settings) from the ``cfg`` of an original fine-tuned checkpoint."""
    model = cfg.get("model") if isinstance(cfg, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("pretrained_model_args"), dict):
        raise CheckpointError(f"{path}: cfg['model']['pretrained_model_args'] is missing; not a fine-tuned EAT/SSLAM checkpoint")
    encoder = _fairseq_config(path, model["pretrained_model_args"], {})
    mode = model.get("prediction_mode", "CLS_TOKEN")
    return encoder, {"use_fc_norm": model.get("use_fc_norm", True), "pooling": _pooling(path, mode),
                     "num_classes": model.get("num_classes")}


def _read_finetuned(path: str, ckpt: Dict[str, Any]) -> ReleasedWeights:
    config, settings = finetuned_config(path, ckpt.get("cfg") or {})
    state = dict(ckpt["model"])
    head = {k: state.pop(k) for k in ("head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias") if k in state}
    if "head.weight" not in head or "head.bias" not in head:
        raise CheckpointError(f"{path}: a fine-tuned checkpoint needs model['head.weight'] and model['head.bias']")
    if settings["use_fc_norm"] != ("fc_norm.weight" in head):
        raise CheckpointError(f"{path}: cfg use_fc_norm={settings['use_fc_norm']} but fc_norm weights are "
                              f"{'present' if 'fc_norm.weight' in head else 'absent'}")
    if settings["num_classes"] is not None and head["head.weight"].shape[0] != settings["num_classes"]:
        raise CheckpointError(f"{path}: head has {head['head.weight'].shape[0]} classes, cfg num_classes is {settings['num_classes']}")
    parts = _fairseq_parts(path, state, prefix="model.")
    if parts["teacher"] is not None or parts["decoder"] is not None:
        raise CheckpointError(f"{path}: a fine-tuned checkpoint holds a teacher or decoder")
    return ReleasedWeights(
        config, parts["student"], "fairseq-finetuned", positions=parts["positions"],
        head=HeadWeights(head["head.weight"], head["head.bias"], head.get("fc_norm.weight"), head.get("fc_norm.bias"),
                         1e-6, settings["pooling"], _fairseq_extra(ckpt).get("labels"),
                         _fairseq_extra(ckpt).get("task", "multilabel")))


def _is_finetuned(ckpt: Dict[str, Any]) -> bool:
    model = ckpt.get("model")
    return isinstance(model, dict) and "head.weight" in model


def _input_of(ckpt: Dict[str, Any]) -> InputSettings:
    """The input settings a torch checkpoint stores: our files beside the weights, run checkpoints
    in their config's data section, our fairseq exports in ``extra_state``; else AudioSet's."""
    fmt = ckpt.get("format")
    if fmt == OWN_FORMAT:
        return InputSettings.from_dict(ckpt.get("input"), "stored in the checkpoint")
    if fmt in (TRAIN_FORMAT, FINETUNE_FORMAT):
        return InputSettings.from_dict((ckpt.get("config") or {}).get("data"), "the run's data config")
    return InputSettings.from_dict(_fairseq_extra(ckpt).get("input"), "stored in the checkpoint's extra_state")


def _fairseq_extra(ckpt: Dict[str, Any]) -> Dict[str, Any]:
    """What our fairseq exports add in ``extra_state["sslam_fast"]`` (input settings, class names);
    the original code ignores it."""
    extra = ckpt.get("extra_state")
    stored = extra.get("sslam_fast") if isinstance(extra, dict) else None
    return stored if isinstance(stored, dict) else {}


def _read_own_finetuned(path: str, ckpt: Dict[str, Any]) -> ReleasedWeights:
    """A fine-tuning run's ``train.pt``: ``encoder.*``, ``head_norm.*`` (LayerNorm), ``head.*``."""
    if "encoder_config" not in ckpt:
        raise CheckpointError(f"{path}: a fine-tuning checkpoint written before it stored its encoder's config "
                              "('encoder_config'); fine-tune again with this version")
    config = from_dict(SSLAMConfig, ckpt["encoder_config"], where=f"{path}: encoder_config")
    state = ckpt["model"]
    student = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    config_of_run = ckpt.get("config") or {}
    eps = (config_of_run.get("model") or {}).get("head_norm_eps", 1e-6)
    task = (config_of_run.get("data") or {}).get("task", "multilabel")
    head = HeadWeights(state["head.weight"], state["head.bias"], state["head_norm.weight"], state["head_norm.bias"],
                       float(eps), "cls", ckpt.get("class_names"), task)
    return ReleasedWeights(config, student, "sslam-fast fine-tuning run", head=head)


def _weights_of(path: str, found: str, ckpt: Dict[str, Any]) -> ReleasedWeights:
    """``ReleasedWeights`` of a torch checkpoint already read by ``safe_load``."""
    if not isinstance(ckpt, dict) or "model" not in ckpt and "student" not in ckpt:
        raise CheckpointError(f"{path}: not a checkpoint of SSLAM/EAT (no 'model' or 'student' entry)")
    fmt = ckpt.get("format")
    if fmt == FINETUNE_FORMAT:
        weights = _read_own_finetuned(path, ckpt)
    elif fmt in (OWN_FORMAT, TRAIN_FORMAT):
        model = load_pretrainer(path)
        source = "sslam-fast pretraining run" if fmt == TRAIN_FORMAT else "sslam-fast pretrainer file"
        weights = ReleasedWeights(model.cfg, model.student.state_dict(), source, model.teacher.state_dict(),
                                  model.decoder.state_dict())
    elif _is_finetuned(ckpt):
        weights = _read_finetuned(path, ckpt)
    else:
        config = _fairseq_config(path, ckpt.get("cfg") or {}, {})
        parts = _fairseq_parts(path, ckpt["model"])
        weights = ReleasedWeights(config, parts["student"], "fairseq-pretraining", parts["teacher"], parts["decoder"],
                                  parts["positions"])
    return dataclasses.replace(weights, input=_input_of(ckpt), path=path, found=found)


# Our encoder names <-> the Hugging Face EAT names (under "model.").
_HF_RENAMES = {
    "patch_embed.weight": "local_encoder.proj.weight",
    "patch_embed.bias": "local_encoder.proj.bias",
    "cls_token": "extra_tokens",
    "norm.weight": "pre_norm.weight",
    "norm.bias": "pre_norm.bias",
}
_HF_POSITIONS = "model.fixed_positional_encoder.positions"


def _hf_encoder_key(key: str) -> Optional[str]:
    """Hugging Face EAT parameter name (without "model.") -> ours."""
    if key.startswith("blocks."):
        return key
    return {v: k for k, v in _HF_RENAMES.items()}.get(key)


def _hf_config(path: str, config: Dict[str, Any]) -> SSLAMConfig:
    values = {"embed_dim": config.get("embed_dim"), "depth": config.get("depth"), "num_heads": config.get("num_heads"),
              "mlp_ratio": config.get("mlp_ratio"), "norm_eps": config.get("norm_eps"),
              "patch_size": config.get("patch_size"), "max_time_patches": config.get("max_length"),
              "num_mel_bins": config.get("mel_bins")}
    if config.get("stride", config.get("patch_size")) != config.get("patch_size") or config.get("layer_norm_first"):
        raise CheckpointError(f"{path}: overlapping patches or pre-LN blocks are not the SSLAM/EAT encoder")
    values = {k: v for k, v in values.items() if v is not None}
    values["average_top_k_layers"] = values.get("depth", 12)
    return from_dict(SSLAMConfig, values, where=f"{path}: config.json")


def _read_safetensors(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read as a safetensors file ({exc})") from exc


def _prefixed(tensors: Dict[str, torch.Tensor], prefix: str) -> Optional[Dict[str, torch.Tensor]]:
    out = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return out or None


def _check_head_settings(path: str, settings: Dict[str, Any]) -> None:
    """The head settings of a file's metadata: a known pooling, a finite fc_norm_eps in (0, 1]."""
    pooling, eps = settings.get("pooling", "cls"), settings.get("fc_norm_eps", 1e-6)
    if pooling not in POOLINGS.values():
        raise ConfigError(f"{path}: head pooling {pooling!r} is not one of {', '.join(map(repr, POOLINGS.values()))}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= 1:
        raise ConfigError(f"{path}: head fc_norm_eps {eps!r} is outside (0, 1]")


def _head_from(path: str, tensors: Dict[str, torch.Tensor], prefix: str, settings: Dict[str, Any]) -> Optional[HeadWeights]:
    if prefix + "head.weight" not in tensors:
        return None
    _check_head_settings(path, settings)
    return HeadWeights(tensors[prefix + "head.weight"], tensors[prefix + "head.bias"],
                       tensors.get(prefix + "fc_norm.weight"), tensors.get(prefix + "fc_norm.bias"),
                       float(settings.get("fc_norm_eps", 1e-6)), settings.get("pooling", "cls"), settings.get("labels"),
                       settings.get("task", "multilabel"))


def _read_hf_folder(path: str) -> ReleasedWeights:
    config_path, weights_path = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
    for needed in (config_path, weights_path):
        if not os.path.isfile(needed):
            raise CheckpointError(f"{path}: a Hugging Face model folder needs {os.path.basename(needed)}")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except ValueError as exc:
        raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from exc
    tensors, _ = _read_safetensors(weights_path)
    ours = config.get("sslam_fast") or {}
    cfg = (from_dict(SSLAMConfig, ours["config"], where=f"{config_path}: sslam_fast.config") if "config" in ours
           else _hf_config(config_path, config))
    student, extra = {}, {}
    for key, value in tensors.items():
        inner = key[len("model."):] if key.startswith("model.") else None
        if key == _HF_POSITIONS:
            continue
        if inner is not None and (name := _hf_encoder_key(inner)) is not None:
            student[name] = value
        elif inner in ("head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"):
            extra[inner] = value
        elif not key.startswith(("teacher.", "decoder.")):
            raise CheckpointError(f"{weights_path}: unexpected tensor {key!r} in a Hugging Face EAT folder")
    # The hub's fine-tuned model applies nn.LayerNorm's default eps (1e-5) in fc_norm.
    settings = {"fc_norm_eps": ours.get("fc_norm_eps", 1e-5), "pooling": ours.get("pooling", "cls"),
                "labels": ours.get("labels"), "task": ours.get("task", "multilabel")}
    return ReleasedWeights(cfg, student, "hf", _prefixed(tensors, "teacher."), _prefixed(tensors, "decoder."),
                           tensors.get(_HF_POSITIONS), _head_from(path, extra, "", settings),
                           InputSettings.from_dict(ours.get("input"), "stored in config.json"))


def _read_own_safetensors(path: str) -> ReleasedWeights:
    tensors, meta = _read_safetensors(path)
    if meta.get("format") != SAFETENSORS_FORMAT:
        raise CheckpointError(f"{path}: not a safetensors file exported by sslam-fast (metadata format "
                              f"{meta.get('format')!r}); a Hugging Face folder needs its config.json beside it")
    cfg = from_dict(SSLAMConfig, json.loads(meta["config"]), where=f"{path}: config")
    settings = json.loads(meta.get("head", "{}"))
    student = _prefixed(tensors, "student.")
    if not student:
        raise CheckpointError(f"{path}: holds no student.* tensors")
    return ReleasedWeights(cfg, student, "safetensors", _prefixed(tensors, "teacher."), _prefixed(tensors, "decoder."),
                           tensors.get("positions"), _head_from(path, tensors, "", settings),
                           InputSettings.from_dict(json.loads(meta.get("input", "{}")), "stored in the file's metadata"))


@names_the_file
def read_weights(path) -> ReleasedWeights:
    """Read any supported checkpoint (every form ``resolve_checkpoint`` names): original pretraining
    or fine-tuned (fairseq), this project's files and run checkpoints, an exported ``.safetensors``
    or a Hugging Face style folder (config.json + model.safetensors).

    Nothing from the file is executed; errors name the file.
    """
    file, found = resolve_checkpoint(path)
    if os.path.isdir(file):
        weights = _read_hf_folder(file)
    elif file.endswith(".safetensors"):
        weights = _read_own_safetensors(file)
    else:
        return _weights_of(file, found, _read_torch(file))
    return dataclasses.replace(weights, path=file, found=found)


# --------------------------------------------------------------------------- writers
# The original's order of a block's parameters (a safetensors file keeps no order; fairseq's has one).
_BLOCK_ORDER = [f"{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")]


def _block_order(key: str):
    _, index, rest = key.split(".", 2)
    return int(index), _BLOCK_ORDER.index(rest) if rest in _BLOCK_ORDER else len(_BLOCK_ORDER), rest


def _decoder_order(key: str):
    parts = key.split(".")
    return (0, int(parts[1]), parts[2] != "weight") if parts[0] == "convs" else (1, 0, parts[-1] != "weight")


def _fairseq_decoder(decoder: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in sorted(decoder.items(), key=lambda item: _decoder_order(item[0])):
        parts = key.split(".")
        out[_ENC + "decoder." + (f"blocks.{parts[1]}.0.{parts[2]}" if parts[0] == "convs" else key)] = value
    return out


def _fairseq_encoder(student: Dict[str, torch.Tensor], positions: torch.Tensor, prefix: str = "",
                     decoder: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """Our encoder (and decoder) state -> original names, in the original's order: extra tokens,
    local encoder, positions, context norm, decoder, blocks."""
    stem = [("cls_token", _ENC + "extra_tokens"), ("patch_embed.weight", _ENC + "local_encoder.proj.weight"),
            ("patch_embed.bias", _ENC + "local_encoder.proj.bias"), (None, _POSITIONS),
            ("norm.weight", _ENC + "context_encoder.norm.weight"), ("norm.bias", _ENC + "context_encoder.norm.bias")]
    state = {prefix + theirs: positions if ours is None else student[ours] for ours, theirs in stem}
    for key, value in _fairseq_decoder(decoder or {}).items():
        state[prefix + key] = value
    for key in sorted((k for k in student if k.startswith("blocks.")), key=_block_order):
        state[prefix + key] = student[key]
    return state


def _fairseq_model_cfg(c: SSLAMConfig) -> Dict[str, Any]:
    return {
        "_name": "data2vec_multi", "embed_dim": c.embed_dim, "depth": c.depth, "num_heads": c.num_heads,
        "mlp_ratio": c.mlp_ratio, "norm_eps": c.norm_eps, "norm_affine": True, "layer_norm_first": False,
        "average_top_k_layers": c.average_top_k_layers, "clone_batch": c.clone_batch, "loss_scale": c.loss_scale,
        "cls_loss": c.cls_loss_weight, "ema_decay": c.ema_decay, "ema_end_decay": c.ema_end_decay,
        "ema_anneal_end_step": c.ema_anneal_end_step, "instance_norm_target_layer": True, "layer_norm_targets": True,
        "supported_modality": "IMAGE",
        "modalities": {"_name": None, "image": {
            "type": "IMAGE", "in_chans": 1, "embed_dim": c.embed_dim, "patch_size": c.patch_size,
            "max_length": c.max_time_patches, "target_length": 1024, "num_extra_tokens": 1, "fixed_positions": True,
            "inverse_mask": True, "mask_prob": c.mask_prob, "mask_length": c.mask_length,
            "mask_prob_adjust": c.mask_prob_adjust, "mask_noise_std": c.mask_noise_std, "prenet_depth": 0,
            "decoder": {"decoder_dim": c.embed_dim, "decoder_layers": c.decoder_layers,
                        "decoder_kernel": c.decoder_kernel, "decoder_groups": c.decoder_groups,
                        "decoder_residual": True, "projection_layers": 1},
        }},
    }


def _fairseq_task_cfg(name: str) -> Dict[str, Any]:
    return {"_name": name, "audio_mae": True, "downsr_16hz": True, "target_length": 1024, "h5_format": False}


def _fairseq_envelope(cfg: Dict[str, Any], state: Dict[str, Any], weights: ReleasedWeights) -> Dict[str, Any]:
    extra = {"input": weights.input.to_dict()}
    if weights.head is not None:
        extra["task"] = weights.head.task
        if weights.head.labels is not None:
            extra["labels"] = list(weights.head.labels)
    return {"args": None, "cfg": cfg, "model": state, "criterion": None,
            "optimizer_history": [], "task_state": {}, "extra_state": {"sslam_fast": extra}}


def fairseq_checkpoint(weights: ReleasedWeights) -> Dict[str, Any]:
    """The original fairseq layout: pretraining (student, decoder, ``_ema`` teacher in fp32) or, for
    weights with a head, fine-tuned (``model.`` encoder, ``fc_norm``, ``head``); cfg nested as the
    original writes it (``cfg["model"]["modalities"]["image"]["decoder"]``, ``pretrained_model_args``)."""
    positions = weights.positions_table()
    common = {"_name": None, "user_dir": "EAT"}
    if weights.head is None:
        state = _fairseq_encoder(weights.student, positions, decoder=weights.decoder)
        if weights.teacher is not None:
            state["_ema"] = _fairseq_encoder({k: v.float() for k, v in weights.teacher.items()}, positions.float())
        cfg = {"_name": None, "common": common, "model": _fairseq_model_cfg(weights.config),
               "task": _fairseq_task_cfg("mae_image_pretraining"), "criterion": {"_name": "model"}}
        return _fairseq_envelope(cfg, state, weights)
    head = weights.head
    state = _fairseq_encoder(weights.student, positions, prefix="model.")
    if head.norm_weight is not None:
        state["fc_norm.weight"], state["fc_norm.bias"] = head.norm_weight, head.norm_bias
    state["head.weight"], state["head.bias"] = head.weight, head.bias
    mode = {v: k for k, v in _POOLING_NAMES.items()}[head.pooling]
    pretrained = {"_name": None, "common": common, "model": _fairseq_model_cfg(weights.config),
                  "task": _fairseq_task_cfg("mae_image_pretraining")}
    model_cfg = {"_name": "mae_image_classification", "model_path": "", "num_classes": head.num_classes,
                 "use_fc_norm": head.norm_weight is not None, "prediction_mode": mode, "audio_mae": True,
                 "target_length": 1024, "pretrained_model_args": pretrained}
    cfg = {"_name": None, "common": common, "model": model_cfg, "task": _fairseq_task_cfg("mae_image_classification"),
           "criterion": {"_name": "model"}}
    return _fairseq_envelope(cfg, state, weights)


def _head_settings(weights: ReleasedWeights) -> Dict[str, Any]:
    head = weights.head
    if head is None:
        return {}
    settings = {"pooling": head.pooling, "fc_norm_eps": head.norm_eps, "num_classes": head.num_classes,
                "task": head.task}
    if head.labels is not None:
        settings["labels"] = list(head.labels)
    return settings


def _head_tensors(head: Optional[HeadWeights], prefix: str) -> Dict[str, torch.Tensor]:
    if head is None:
        return {}
    out = {prefix + "head.weight": head.weight, prefix + "head.bias": head.bias}
    if head.norm_weight is not None:
        out[prefix + "fc_norm.weight"], out[prefix + "fc_norm.bias"] = head.norm_weight, head.norm_bias
    return out


def _extras(weights: ReleasedWeights) -> Dict[str, torch.Tensor]:
    out = {}
    for part in ("teacher", "decoder"):
        for key, value in (getattr(weights, part) or {}).items():
            out[f"{part}.{key}"] = value
    return out


def safetensors_tensors(weights: ReleasedWeights) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(tensors, metadata) of this project's safetensors file: ``student.*``, ``teacher.*``,
    ``decoder.*``, ``positions``, ``head.*``/``fc_norm.*``; config and head settings as JSON metadata."""
    tensors = {f"student.{k}": v for k, v in weights.student.items()}
    tensors.update(_extras(weights))
    tensors["positions"] = weights.positions_table()
    tensors.update(_head_tensors(weights.head, ""))
    meta = {"format": SAFETENSORS_FORMAT, "config": json.dumps(to_dict(weights.config)),
            "head": json.dumps(_head_settings(weights)), "input": json.dumps(weights.input.to_dict())}
    return tensors, meta


def hf_folder(weights: ReleasedWeights) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(config.json, model.safetensors tensors) in the Hugging Face EAT layout: the student under
    ``model.*`` with the hub's names; teacher and decoder, when present, under ``teacher.*`` and
    ``decoder.*`` in this project's names (the hub's code ignores them)."""
    c = weights.config
    tensors = {}
    for key, value in weights.student.items():
        tensors["model." + _HF_RENAMES.get(key, key)] = value
    tensors[_HF_POSITIONS] = weights.positions_table()
    tensors.update(_head_tensors(weights.head, "model."))
    tensors.update(_extras(weights))
    config = {
        "architectures": ["EATModel"], "model_type": "eat", "embed_dim": c.embed_dim, "depth": c.depth,
        "num_heads": c.num_heads, "patch_size": c.patch_size, "stride": c.patch_size, "in_chans": 1,
        "mel_bins": c.num_mel_bins, "max_length": c.max_time_patches, "mlp_ratio": c.mlp_ratio, "qkv_bias": True,
        "layer_norm_first": False, "norm_eps": c.norm_eps, "norm_affine": True, "fixed_positions": True,
        "img_size": [1024, c.num_mel_bins],
        "model_variant": "finetune" if weights.head is not None else "pretrain",
        "num_classes": weights.head.num_classes if weights.head is not None else 527,
        "sslam_fast": {"config": to_dict(c), "input": weights.input.to_dict(), **_head_settings(weights)},
    }
    if weights.head is not None and weights.head.labels is not None:
        config["id2label"] = {str(i): name for i, name in enumerate(weights.head.labels)}
    return config, tensors
