"""Swap-in entry points: patch LIVE model instances, so a student and its EMA teacher can be
treated separately (patch one, both, or neither).

Each ``apply_*`` rebinds methods on the given instance only (the class is untouched) and keeps
the original as ``_sslam_original_<name>``. A patched method takes its fused path only for the
inputs the kernels cover (the same result as the original) and otherwise calls the original, so
outputs are unchanged after patching. Nothing falls back silently: every patched method counts
its fused runs and its fallbacks (with the reason), ``apply_*`` returns a ``PatchReport`` over
those counters (``patch_report(model)`` rebuilds it for any model, e.g. a deep copy), and with
``strict=True`` a fallback raises ``FastPathFallback`` naming its reason.

``use_triton`` is passed through to the ops (None: Triton for CUDA tensors, the PyTorch reference
otherwise).
"""
import types
from typing import Dict, List, Optional

import torch
from torch import nn

from ._triton import triton_available
from .fused_ema import FusedEMA
from .gather import decoder_input_gather, embed_mask_gather
from .targets import _fits_kernel, layer_averaged_target


class FastPathFallback(RuntimeError):
    """A patched method fell back to the original code while its counter was strict."""


class PathCounter:
    """Runs of one patched method: ``fast`` (the fused path) and ``fallback`` (the original code),
    with the count of each fallback reason in ``reasons``."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.fast = 0
        self.fallback = 0
        self.reasons: Dict[str, int] = {}

    def hit(self) -> None:
        self.fast += 1

    def miss(self, where: str, reason: str) -> None:
        self.fallback += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if self.strict:
            raise FastPathFallback(f"{where} fell back to the original code: {reason}")


class PatchReport:
    """What was patched in a model, with the live counters of every patched method.

    ``counts()``: {name: {"fast": n, "fallback": m}}; ``reasons()``: {name: {reason: m}};
    ``str(report)``: one line per patched method. ``name in report`` tells whether it was patched.
    """

    def __init__(self, counters: Dict[str, PathCounter]):
        self.counters = counters

    @property
    def patched(self) -> List[str]:
        return list(self.counters)

    def counts(self) -> Dict[str, Dict[str, int]]:
        return {n: {"fast": c.fast, "fallback": c.fallback} for n, c in self.counters.items()}

    def reasons(self) -> Dict[str, Dict[str, int]]:
        return {n: dict(c.reasons) for n, c in self.counters.items() if c.reasons}

    def reset(self) -> None:
        for c in self.counters.values():
            c.fast, c.fallback, c.reasons = 0, 0, {}

    def __contains__(self, name: str) -> bool:
        return name in self.counters

    def __str__(self) -> str:
        lines = []
        for n, c in self.counters.items():
            why = "; ".join(f"{r} ({k})" for r, k in c.reasons.items())
            lines.append(f"{n}: fast {c.fast}, fallback {c.fallback}" + (f" [{why}]" if why else ""))
        return "\n".join(lines) or "nothing patched"


def patch_report(model: nn.Module) -> PatchReport:
    """The counters of every method patched in ``model`` (and its submodules), by qualified name."""
    counters = {}
    for prefix, module in model.named_modules():
        for method, counter in getattr(module, "_sslam_counters", {}).items():
            counters[f"{prefix}.{method}" if prefix else method] = counter
    return PatchReport(counters)


def _rebind(obj: nn.Module, name: str, fn, strict: bool) -> None:
    if not hasattr(obj, f"_sslam_original_{name}"):
        setattr(obj, f"_sslam_original_{name}", getattr(obj, name))
    setattr(obj, name, types.MethodType(fn, obj))
    if "_sslam_counters" not in obj.__dict__:
        obj._sslam_counters = {}
    obj._sslam_counters.setdefault(name, PathCounter()).strict = strict


def _fallback(module: nn.Module, name: str, reason: str):
    """Count a fallback of ``module.name`` (raises if strict); returns the original method."""
    module._sslam_counters[name].miss(f"{type(module).__name__}.{name}", reason)
    return getattr(module, f"_sslam_original_{name}")


def _table_2d(pos: torch.Tensor) -> torch.Tensor:
    return pos.reshape(-1, pos.shape[-1])


def _promoted(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    dtypes = [t.dtype for t in tensors if t is not None]
    out = dtypes[0]
    for dt in dtypes[1:]:
        out = torch.promote_types(out, dt)
    return out


# Hugging Face transformers: Audio Spectrogram Transformer -------------------------------------

def apply_sslam_kernels_to_ast(model: nn.Module, use_triton: Optional[bool] = None,
                               strict: bool = False) -> PatchReport:
    """Patch an ``ASTModel`` / ``ASTForAudioClassification`` instance: the embeddings' positional
    add and [CLS, distillation] prepend run as one fused kernel (with its backward). AST adds its
    whole table (no slicing, no interpolation): any other table shape falls back."""
    embeddings = model.embeddings if hasattr(model, "embeddings") else model.audio_spectrogram_transformer.embeddings

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embeddings(input_values)
        pos = self.position_embeddings
        if patches.dim() != 3 or tuple(pos.shape) != (1, patches.shape[1] + 2, patches.shape[2]):
            return _fallback(self, "forward", f"position table {tuple(pos.shape)} for "
                             f"{tuple(patches.shape)} patches")(input_values)
        self._sslam_counters["forward"].hit()
        pos = _table_2d(pos)
        prefix = torch.cat([_table_2d(self.cls_token), _table_2d(self.distillation_token)]) + pos[:2]
        x = embed_mask_gather(patches, pos[2:], prefix, None, 1, use_triton=use_triton,
                              out_dtype=_promoted(patches, pos))
        return self.dropout(x)

    _rebind(embeddings, "forward", forward, strict)
    return patch_report(model)


# timm VisionTransformer ------------------------------------------------------------------------

def apply_sslam_kernels_to_timm_vit(model: nn.Module, use_triton: Optional[bool] = None,
                                    strict: bool = False) -> PatchReport:
    """Patch a timm ``VisionTransformer`` instance: prefix tokens (class / register) and the
    positional add in one fused kernel, for a table of exactly the input's grid. Dynamic image
    size (timm resamples the table) and any other table shape fall back to timm's own code."""

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "dynamic_img_size", False):
            return _fallback(self, "_pos_embed", "dynamic_img_size (timm resamples the table)")(x)
        if self.pos_embed is None or x.dim() != 3:
            return _fallback(self, "_pos_embed", "no position table or input not [B, N, D]")(x)
        D = x.shape[-1]
        tokens = [_table_2d(t) for t in (getattr(self, "cls_token", None), getattr(self, "reg_token", None))
                  if t is not None]
        prefix = torch.cat(tokens) if tokens else None
        pos = _table_2d(self.pos_embed)
        n_prefix = 0 if prefix is None else prefix.shape[0]
        patch_pos = pos if getattr(self, "no_embed_class", False) else pos[n_prefix:]
        if self.pos_embed.dim() != 3 or self.pos_embed.shape[0] != 1 or patch_pos.shape != (x.shape[1], D):
            return _fallback(self, "_pos_embed", f"position table {tuple(self.pos_embed.shape)} for "
                             f"{tuple(x.shape)} patches")(x)
        self._sslam_counters["_pos_embed"].hit()
        if prefix is not None and not getattr(self, "no_embed_class", False):
            prefix = prefix + pos[:n_prefix]
        x = embed_mask_gather(x, patch_pos, prefix, None, 1, use_triton=use_triton, out_dtype=_promoted(x, pos))
        return self.pos_drop(x)

    _rebind(model, "_pos_embed", _pos_embed, strict)
    return patch_report(model)


# fairseq data2vec 2.0 / EAT / SSLAM ------------------------------------------------------------

def _is_d2v_modality_encoder(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("contextualized_features", "decoder_input", "make_maskinfo",
                                            "modality_cfg", "context_encoder"))


def _d2v_unsupported(enc, x, padding_mask, mask, remove_masked, clone_batch, precomputed_mask) -> Optional[str]:
    """Why ``contextualized_features`` cannot take the fused path for these arguments (or None)."""
    if x.dim() != 3:
        return f"input of shape {tuple(x.shape)}, not [B, T, D]"
    if padding_mask is not None:
        return "padding mask"
    if getattr(enc, "relative_positional_encoder", None) is not None:
        return "relative positional encoder"
    if getattr(enc, "get_alibi_bias", None) is not None or getattr(enc, "alibi_scale", None) is not None:
        return "ALiBi"
    if mask:
        if not remove_masked:
            return "masked patches kept (remove_masked=False)"
        if precomputed_mask is None:
            return "mask drawn inside the model (no precomputed_mask)"
        B, T, _ = x.shape
        if tuple(precomputed_mask.shape) != (B * clone_batch, T):
            return f"precomputed_mask {tuple(precomputed_mask.shape)} for {B * clone_batch} views of {T} patches"
    return None


def _d2v_positions(enc, x):
    """(table [T, D] or None, reason): the fixed positions the original adds to ``x`` [B, T, D],
    i.e. the first T rows of a [1, L >= T, D] table (EAT / SSLAM build it for ``max_length`` and
    slice it to the input); any other table shape gives a reason to fall back."""
    if enc.fixed_positional_encoder is None:
        return None, None
    pos = enc.fixed_positional_encoder(x, None)
    _, T, D = x.shape
    if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[2] != D or pos.shape[1] < T:
        return None, f"positional table {tuple(pos.shape)} for input {tuple(x.shape)}"
    return pos[0, :T], None


def _patch_d2v_modality_encoder(enc: nn.Module, use_triton: Optional[bool], strict: bool) -> None:
    def contextualized_features(self, x, padding_mask, mask, remove_masked, clone_batch: int = 1,
                                mask_seeds=None, precomputed_mask=None):
        reason = _d2v_unsupported(self, x, padding_mask, mask, remove_masked, clone_batch, precomputed_mask)
        pos = None
        if reason is None:
            pos, reason = _d2v_positions(self, x)
        if reason is not None:
            return _fallback(self, "contextualized_features", reason)(
                x, padding_mask, mask, remove_masked, clone_batch, mask_seeds, precomputed_mask)
        self._sslam_counters["contextualized_features"].hit()
        B, T, D = x.shape
        extra = self.extra_tokens
        ids_keep = mask_info = None
        clone = clone_batch if mask else 1
        if mask:
            # the original's ordering of visible patches (argsort of the mask), without the gather
            mask_info = self.make_maskinfo(None, precomputed_mask, shape=(B * clone, T, D))
            ids_keep = mask_info.ids_keep
        tokens = embed_mask_gather(x, pos, extra, ids_keep, clone, use_triton=use_triton,
                                   out_dtype=_promoted(x, pos, extra))
        if mask:
            num_extra = 0 if extra is None else extra.shape[1]
            mask_info = mask_info._replace(x_unmasked=tokens[:, num_extra:],
                                           ids_keep=ids_keep.unsqueeze(-1).expand(-1, -1, D))
        return {
            "x": self.context_encoder(tokens, None, None, None),
            "local_features": x.clone() if mask and clone_batch == 1 else x,
            "padding_mask": None,
            "alibi_bias": None,
            "alibi_scale": None,
            "encoder_mask": mask_info,
        }

    def decoder_input(self, x, mask_info):
        dec = self.modality_cfg.decoder
        reason = None
        if mask_info is None:
            reason = "no mask_info"
        elif dec.input_dropout > 0 and self.training:
            reason = "decoder input dropout"
        elif getattr(dec, "add_positions_masked", False) or getattr(dec, "add_positions_all", False):
            reason = "decoder adds positions"
        if reason is not None:
            return _fallback(self, "decoder_input", reason)(x, mask_info)
        self._sslam_counters["decoder_input"].hit()
        cfg = self.modality_cfg
        num_extra = cfg.num_extra_tokens
        num_masked = mask_info.ids_restore.shape[1] - x.shape[1] + num_extra
        # drawn exactly as the original draws them (same shape, same generator state)
        tokens = x.new_empty(x.size(0), num_masked, x.size(-1)).normal_(0, cfg.mask_noise_std)
        return decoder_input_gather(x, mask_info.ids_restore, tokens, num_extra, use_triton=use_triton), mask_info

    _rebind(enc, "contextualized_features", contextualized_features, strict)
    _rebind(enc, "decoder_input", decoder_input, strict)


def _eat_target_config(cfg) -> bool:
    return (getattr(cfg, "instance_norm_target_layer", False) and getattr(cfg, "layer_norm_targets", False)
            and not getattr(cfg, "batch_norm_target_layer", False)
            and not getattr(cfg, "layer_norm_target_layer", False)
            and not getattr(cfg, "instance_norm_targets", False))


def _patch_d2v_make_targets(model: nn.Module, use_triton: Optional[bool], strict: bool) -> None:
    def make_targets(self, y, num_layers):
        reason = None
        if not _eat_target_config(self.cfg):
            reason = "target normalisation other than EAT's (instance norm per layer, LayerNorm of the average)"
        elif not isinstance(y, list) or not y:
            reason = "layer results not a non-empty list"
        else:
            layers = y[-num_layers:]
            triton_path = use_triton if use_triton is not None else layers[0].is_cuda and triton_available
            if triton_path and not _fits_kernel(layers):
                reason = "layers differ in shape, dtype or strides, or T > 4096"
        if reason is not None:
            return _fallback(self, "make_targets", reason)(y, num_layers)
        self._sslam_counters["make_targets"].hit()
        return layer_averaged_target(layers, 1e-5, 1e-5, use_triton=use_triton)

    _rebind(model, "make_targets", make_targets, strict)


def apply_fused_ema_to_eat(model: nn.Module, backend: str = "auto") -> None:
    """Replace ``model.ema.step`` (fairseq's ``EMAModule``: a per-tensor loop) on this instance by
    ``FusedEMA``: the teacher's fp32 copies (``model.ema.fp32_params`` with ``ema_fp32``, else the
    teacher model's own parameters, which must then be fp32) are blended with the student's
    parameters of the same names in one launch, frozen ones (``requires_grad=False``, e.g. the
    fixed positions) copied; then, as the original step does, the fp32 copies are loaded into
    the teacher model. The decay is ``model.ema.get_decay()``, as fairseq sets it. The FusedEMA is
    rebuilt when fairseq replaces the fp32 tensors (e.g. moving them to the GPU)."""
    ema_module = model.ema
    built = {}

    def step(new_model: nn.Module) -> None:
        fp32 = getattr(ema_module.config, "ema_fp32", False)
        target = ema_module.fp32_params if fp32 else dict(ema_module.model.named_parameters())
        names = [n for n, _ in new_model.named_parameters() if n in target]
        key = tuple(id(target[n]) for n in names)
        if built.get("key") != key:
            built["ema"] = FusedEMA(new_model, target, names=names, backend=backend)
            built["key"] = key
        built["ema"].update(ema_module.get_decay())
        if fp32:
            ema_module.restore({n: target[n] for n in names}, build_fp32_params=False)

    ema_module.step = step


def apply_sslam_kernels_to_eat(model: nn.Module, use_triton: Optional[bool] = None,
                               strict: bool = False) -> PatchReport:
    """Patch a fairseq data2vec 2.0 / EAT / SSLAM model instance (``Data2VecMultiModel``-style):

    - every modality encoder (``ModalitySpecificEncoder``-style: ``contextualized_features``,
      ``decoder_input``, ``make_maskinfo``): positional add (the first T rows of the fixed table,
      as EAT / SSLAM slice their ``max_length`` table) + clone_batch expansion + visible gather
      + extra-token prepend fused, for the student's masked path with a precomputed mask and for
      the teacher's unmasked path, without padding or ALiBi; the decoder input is built without
      the concatenated copy;
    - the model's ``make_targets``: the fused layer-averaged target when the config is EAT's
      (instance norm per target layer, LayerNorm of the average).
    The EMA teacher (``model.ema.model``) is a separate model: patch it with its own call, and
    build ``FusedEMA(model, model.ema.model)`` and call its ``update(decay)`` instead of
    ``model.ema.step``. Returns the report of what was patched (live counters).
    """
    for _, module in model.named_modules():
        if _is_d2v_modality_encoder(module):
            _patch_d2v_modality_encoder(module, use_triton, strict)
    if hasattr(model, "make_targets") and hasattr(model, "cfg"):
        _patch_d2v_make_targets(model, use_triton, strict)
    return patch_report(model)
