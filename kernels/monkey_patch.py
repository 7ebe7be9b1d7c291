"""Swap-in entry points: patch LIVE model instances, so a student and its EMA teacher can be
treated separately (patch one, both, or neither).

Each ``apply_*`` rebinds methods on the given instance only (the class is untouched), keeps the
original as ``_sslam_original_<name>`` and falls back to it on any path the fused kernels do not
cover, so outputs are unchanged after patching. ``use_triton`` is passed through to the ops
(None: Triton for CUDA tensors, the PyTorch reference otherwise).
"""
import types
from typing import Iterable, List, Optional

import torch
from torch import nn

from .fused_ema import FusedEMA
from .gather import decoder_input_gather, embed_mask_gather
from .targets import layer_averaged_target


def apply_fused_ema(student: nn.Module, teacher: nn.Module, names: Optional[Iterable[str]] = None,
                    backend: str = "auto") -> FusedEMA:
    """The one-launch EMA for any (student, teacher) pair: call ``.update(decay)`` each step."""
    return FusedEMA(student, teacher, names=names, backend=backend)


def _rebind(obj, name: str, fn) -> None:
    if not hasattr(obj, f"_sslam_original_{name}"):
        setattr(obj, f"_sslam_original_{name}", getattr(obj, name))
    setattr(obj, name, types.MethodType(fn, obj))


def _table_2d(pos: torch.Tensor) -> torch.Tensor:
    return pos.reshape(-1, pos.shape[-1])


# Hugging Face transformers: Audio Spectrogram Transformer -------------------------------------

def apply_sslam_kernels_to_ast(model: nn.Module, use_triton: Optional[bool] = None) -> nn.Module:
    """Patch an ``ASTModel`` / ``ASTForAudioClassification`` instance: the embeddings' positional
    add and [CLS, distillation] prepend run as one fused kernel (with its backward)."""
    embeddings = model.embeddings if hasattr(model, "embeddings") else model.audio_spectrogram_transformer.embeddings

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embeddings(input_values)
        pos = _table_2d(self.position_embeddings)
        if pos.shape[0] != patches.shape[1] + 2:
            return self._sslam_original_forward(input_values)
        prefix = torch.cat([_table_2d(self.cls_token), _table_2d(self.distillation_token)]) + pos[:2]
        out_dtype = torch.promote_types(patches.dtype, pos.dtype)
        x = embed_mask_gather(patches, pos[2:], prefix, None, 1, use_triton=use_triton, out_dtype=out_dtype)
        return self.dropout(x)

    _rebind(embeddings, "forward", forward)
    return model


# timm VisionTransformer ------------------------------------------------------------------------

def apply_sslam_kernels_to_timm_vit(model: nn.Module, use_triton: Optional[bool] = None) -> nn.Module:
    """Patch a timm ``VisionTransformer`` instance: prefix tokens (class / register) and the
    positional add in one fused kernel. Dynamic image size falls back to timm's own code."""

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "dynamic_img_size", False) or self.pos_embed is None or x.dim() != 3:
            return self._sslam_original__pos_embed(x)
        D = x.shape[-1]
        tokens = [_table_2d(t) for t in (getattr(self, "cls_token", None), getattr(self, "reg_token", None))
                  if t is not None]
        prefix = torch.cat(tokens) if tokens else None
        pos = _table_2d(self.pos_embed)
        if getattr(self, "no_embed_class", False):
            patch_pos = pos
        else:
            n_prefix = 0 if prefix is None else prefix.shape[0]
            patch_pos = pos[n_prefix:]
            if prefix is not None:
                prefix = prefix + pos[:n_prefix]
        if patch_pos.shape != (x.shape[1], D):
            return self._sslam_original__pos_embed(x)
        out_dtype = torch.promote_types(x.dtype, pos.dtype)
        x = embed_mask_gather(x, patch_pos, prefix, None, 1, use_triton=use_triton, out_dtype=out_dtype)
        return self.pos_drop(x)

    _rebind(model, "_pos_embed", _pos_embed)
    return model


# fairseq data2vec 2.0 / EAT / SSLAM ------------------------------------------------------------

def _is_d2v_modality_encoder(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("contextualized_features", "decoder_input", "make_maskinfo",
                                            "modality_cfg", "context_encoder"))


def _patch_d2v_modality_encoder(enc: nn.Module, use_triton: Optional[bool]) -> None:
    def contextualized_features(self, x, padding_mask, mask, remove_masked, clone_batch: int = 1,
                                mask_seeds=None, precomputed_mask=None):
        fast = (mask and remove_masked and precomputed_mask is not None and padding_mask is None
                and getattr(self, "relative_positional_encoder", None) is None
                and getattr(self, "get_alibi_bias", None) is None)
        pos = None
        if fast and self.fixed_positional_encoder is not None:
            pos = self.fixed_positional_encoder(x, None)
            fast = pos.shape[-2:] == x.shape[-2:] and pos.numel() == x.shape[1] * x.shape[2]
        if not fast:
            return self._sslam_original_contextualized_features(
                x, padding_mask, mask, remove_masked, clone_batch, mask_seeds, precomputed_mask)
        B, T, D = x.shape
        # the original's ordering of visible patches (argsort of the mask), without the gather
        mask_info = self.make_maskinfo(None, precomputed_mask, shape=(B * clone_batch, T, D))
        ids_keep = mask_info.ids_keep
        extra = self.extra_tokens
        dtypes = [t.dtype for t in (x, pos, extra) if t is not None]
        out_dtype = dtypes[0]
        for dt in dtypes[1:]:
            out_dtype = torch.promote_types(out_dtype, dt)
        tokens = embed_mask_gather(x, None if pos is None else _table_2d(pos), extra, ids_keep, clone_batch,
                                   use_triton=use_triton, out_dtype=out_dtype)
        num_extra = 0 if extra is None else extra.shape[1]
        mask_info = mask_info._replace(x_unmasked=tokens[:, num_extra:],
                                       ids_keep=ids_keep.unsqueeze(-1).expand(-1, -1, D))
        return {
            "x": self.context_encoder(tokens, None, None, None),
            "local_features": x.clone() if clone_batch == 1 else x,
            "padding_mask": None,
            "alibi_bias": None,
            "alibi_scale": None,
            "encoder_mask": mask_info,
        }

    def decoder_input(self, x, mask_info):
        cfg = self.modality_cfg
        dec = cfg.decoder
        if (mask_info is None or (dec.input_dropout > 0 and self.training)
                or getattr(dec, "add_positions_masked", False) or getattr(dec, "add_positions_all", False)):
            return self._sslam_original_decoder_input(x, mask_info)
        num_extra = cfg.num_extra_tokens
        num_masked = mask_info.ids_restore.shape[1] - x.shape[1] + num_extra
        # drawn exactly as the original draws them (same shape, same generator state)
        tokens = x.new_empty(x.size(0), num_masked, x.size(-1)).normal_(0, cfg.mask_noise_std)
        return decoder_input_gather(x, mask_info.ids_restore, tokens, num_extra, use_triton=use_triton), mask_info

    _rebind(enc, "contextualized_features", contextualized_features)
    _rebind(enc, "decoder_input", decoder_input)


def _patch_d2v_make_targets(model: nn.Module, use_triton: Optional[bool]) -> None:
    def make_targets(self, y, num_layers):
        cfg = self.cfg
        if not (getattr(cfg, "instance_norm_target_layer", False) and getattr(cfg, "layer_norm_targets", False)
                and not getattr(cfg, "batch_norm_target_layer", False)
                and not getattr(cfg, "layer_norm_target_layer", False)
                and not getattr(cfg, "instance_norm_targets", False)):
            return self._sslam_original_make_targets(y, num_layers)
        return layer_averaged_target(y[-num_layers:], 1e-5, 1e-5, use_triton=use_triton)

    _rebind(model, "make_targets", make_targets)


def apply_sslam_kernels_to_eat(model: nn.Module, use_triton: Optional[bool] = None) -> List[str]:
    """Patch a fairseq data2vec 2.0 / EAT / SSLAM model instance (``Data2VecMultiModel``-style):

    - every modality encoder (``ModalitySpecificEncoder``-style: ``contextualized_features``,
      ``decoder_input``, ``make_maskinfo``): positional add + clone_batch expansion + visible
      gather + extra-token prepend fused, for the masked path with a precomputed mask, no padding
      and no ALiBi; the decoder input is built without the concatenated copy;
    - the model's ``make_targets``: the fused layer-averaged target when the config is EAT's
      (instance norm per target layer, LayerNorm of the average).
    The EMA teacher is separate: build ``apply_fused_ema(model, model.ema.model)`` and call its
    ``update(decay)`` instead of ``model.ema.step``. Returns the names of what was patched.
    """
    patched = []
    for name, module in model.named_modules():
        if _is_d2v_modality_encoder(module):
            _patch_d2v_modality_encoder(module, use_triton)
            patched += [f"{name}.contextualized_features", f"{name}.decoder_input"]
    if hasattr(model, "make_targets") and hasattr(model, "cfg"):
        _patch_d2v_make_targets(model, use_triton)
        patched.append("make_targets")
    return patched
