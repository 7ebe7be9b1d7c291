"""Checkpoint formats: this project's own, and the original fairseq SSLAM / EAT layout.

The original stores ``{"cfg": {...}, "model": state_dict}``; the student's weights sit under
``modality_encoders.IMAGE.*`` and ``blocks.*``, and the EMA teacher's fp32 weights in
``model["_ema"]`` with the same names. Loading needs neither fairseq nor omegaconf.
"""
from typing import Any, Dict, Optional

import torch

from ..config import SSLAMConfig, from_dict, to_dict
from ..pretrainer import SSLAMPretrainer
from ..serialization import CheckpointError, atomic_save, safe_load
from ..trainer.checkpoints import TRAIN_FORMAT

OWN_FORMAT = "sslam-fast/pretrainer"
_ENC = "modality_encoders.IMAGE."


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


def _check_positions(path: str, table: torch.Tensor, model: SSLAMPretrainer) -> None:
    ours = model.student.pos_table
    theirs = table.reshape(-1, table.shape[-1]).float()
    n = min(len(ours), len(theirs))
    if theirs.shape[-1] != ours.shape[-1] or not torch.allclose(theirs[:n], ours[:n], atol=1e-4):
        raise CheckpointError(f"{path}: the stored positional table differs from the 2-D sin-cos table")


def _load_fairseq(path: str, ckpt: Dict[str, Any], overrides: Dict[str, Any]) -> SSLAMPretrainer:
    cfg = _fairseq_config(path, ckpt.get("cfg") or {}, overrides)
    model = SSLAMPretrainer(cfg)
    state = dict(ckpt["model"])
    ema = state.pop("_ema", None)
    student, decoder = {}, {}
    for key, value in state.items():
        if key == _ENC + "fixed_positional_encoder.positions":
            _check_positions(path, value, model)
            continue
        if (name := _fairseq_encoder_key(key)) is not None:
            student[name] = value
        elif (name := _fairseq_decoder_key(key)) is not None:
            decoder[name] = value
        else:
            raise CheckpointError(f"{path}: unexpected key model[{key!r}] in a fairseq SSLAM/EAT checkpoint")
    _load_strict(path, "model", model.student, student)
    if decoder:
        _load_strict(path, "model (decoder)", model.decoder, decoder)
    if ema is not None:
        teacher = {}
        for key, value in ema.items():
            if key == _ENC + "fixed_positional_encoder.positions":
                continue
            name = _fairseq_encoder_key(key)
            if name is None:
                raise CheckpointError(f"{path}: unexpected key model['_ema'][{key!r}]")
            teacher[name] = value.float()
        _load_strict(path, "model['_ema']", model.teacher, teacher)
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
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


# --------------------------------------------------------------------------- public
def load_pretrainer(path: str, map_location="cpu", **overrides) -> SSLAMPretrainer:
    """Read a pretraining checkpoint into an ``SSLAMPretrainer``.

    Accepts the original fairseq SSLAM/EAT format, this project's exported format
    (``save_pretrainer``) and this project's training checkpoints. ``overrides`` replace model
    config values, e.g. ``stage=2`` to continue an EAT (stage-1) checkpoint as SSLAM.
    """
    ckpt = safe_load(path, map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt and "student" not in ckpt:
        raise CheckpointError(f"{path}: not a pretraining checkpoint (no 'model' or 'student' entry)")
    fmt = ckpt.get("format")
    if fmt == OWN_FORMAT:
        model = SSLAMPretrainer(_own_config(path, ckpt["config"], overrides))
        for part in ("student", "decoder", "teacher"):
            _load_strict(path, part, getattr(model, part), ckpt[part])
        return model
    if fmt == TRAIN_FORMAT:
        config = ckpt.get("config") or {}
        model = SSLAMPretrainer(_own_config(path, config.get("model", {}), overrides))
        _load_strict(path, "model", model, ckpt["model"])
        return model
    return _load_fairseq(path, ckpt, overrides)


# Model keys of earlier versions that now live outside the model config (ignored when read).
LEGACY_MODEL_KEYS = ("use_kernels",)


def _own_config(path: str, values: Dict[str, Any], overrides: Dict[str, Any]) -> SSLAMConfig:
    values = {k: v for k, v in values.items() if k not in LEGACY_MODEL_KEYS}
    return from_dict(SSLAMConfig, {**values, **overrides}, where=f"{path}: config")


def save_pretrainer(model: SSLAMPretrainer, path: str) -> None:
    """Write student, decoder, teacher and config in this project's format (atomically)."""
    atomic_save(
        {
            "format": OWN_FORMAT,
            "version": 1,
            "config": to_dict(model.cfg),
            "student": model.student.state_dict(),
            "decoder": model.decoder.state_dict(),
            "teacher": model.teacher.state_dict(),
        },
        path,
    )
