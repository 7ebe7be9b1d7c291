"""Teacher targets and the losses of EAT (stage 1) and SSLAM (stage 2), docs/method.md §5-7."""
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn

from .config import SSLAMConfig
from .mixing import mixed_row_index, mixed_rows


def source_retention_target(teacher: nn.Module, original_tokens: torch.Tensor, own: torch.Tensor,
                            windows: Tuple[int, int], grid: Tuple[int, int], cfg: SSLAMConfig,
                            target: Callable[[List[torch.Tensor]], torch.Tensor], static: bool = True) -> torch.Tensor:
    """The Source Retention target of SSLAM (docs/method.md §7), [B, P, D], one per mixture.

    Mixture i is clip i mixed with clip i-1 outside the two unmixed windows. The teacher encodes
    each original clip again with the patch rows of those windows dropped (original positions
    kept), which gives clip i-1's features for the mixed rows alone; they replace the mixed rows of
    a copy of clip i's own target, and the result is averaged with clip i's target:
    0.5 * (target(A_i) + target_with_partner_in_mixed_rows(A_{i-1})), with no re-normalisation.

    original_tokens: [B, 1 + P, D] the teacher's input tokens of the originals (CLS first,
    positions added); own: [B, P, D] their patch targets; grid: (time, freq) patches;
    target: teacher layers -> layer-averaged target (``layer_averaged_target``).
    static: the mixed rows by a fixed index from the python windows, the dropped-window tokens by
    the fused gather (no bool indexing, no host sync); False: bool-mask indexing and a cat, as
    the original code does it.
    """
    B, P, D = own.shape
    time_patches, freq_patches = grid
    if not static:
        rows = mixed_rows(time_patches, windows, cfg.mix_window, cfg.patch_size, own.device)
        kept = original_tokens[:, 1:].view(B, time_patches, freq_patches, D)[:, rows].reshape(B, -1, D)
        _, layers = teacher.run_blocks(torch.cat([original_tokens[:, :1], kept], dim=1), collect=True)
        partner = torch.roll(target(layers[-cfg.average_top_k_layers:]), shifts=1, dims=0)  # clip i-1 at index i
        rebuilt = own.clone().view(B, time_patches, freq_patches, D)
        rebuilt[:, rows] = partner.view(B, -1, freq_patches, D).to(rebuilt.dtype)
        return 0.5 * (own + rebuilt.view(B, P, D))
    rows = mixed_row_index(time_patches, windows, cfg.mix_window, cfg.patch_size, own.device)
    patches = (rows[:, None] * freq_patches + torch.arange(freq_patches, device=own.device)).reshape(1, -1)
    kept = teacher.ops.embed_mask_gather(original_tokens[:, 1:], None, teacher.cls_token, patches.expand(B, -1))
    _, layers = teacher.run_blocks(kept, collect=True)
    partner = torch.roll(target(layers[-cfg.average_top_k_layers:]), shifts=1, dims=0)  # clip i-1 at index i
    own4 = own.view(B, time_patches, freq_patches, D)
    mixed = 0.5 * (own4.index_select(1, rows) + partner.view(B, -1, freq_patches, D).to(own.dtype))
    return own4.index_copy(1, rows, mixed).view(B, P, D)  # unmixed rows: 0.5 * (own + own) = own exactly


def regression_loss(pred: torch.Tensor, target: torch.Tensor, scale: float) -> torch.Tensor:
    """Summed scaled squared error in fp32: sum((pred - target)^2) * scale."""
    return ((pred.float() - target.float()) ** 2 * scale).sum()


def feature_std(y: torch.Tensor) -> torch.Tensor:
    """Standard deviation over rows, averaged over channels (target_var / pred_var of the logs)."""
    y = y.detach().float().reshape(-1, y.shape[-1])
    if y.shape[0] < 2:
        return torch.zeros((), device=y.device)
    return torch.sqrt(y.var(dim=0) + 1e-6).mean()


def loss_scale(cfg: SSLAMConfig) -> float:
    return cfg.loss_scale if cfg.loss_scale is not None else cfg.embed_dim ** -0.5


def gathered_losses(pred: torch.Tensor, student_cls: torch.Tensor, targets: Dict[str, torch.Tensor],
                    masks: torch.Tensor, cfg: SSLAMConfig) -> Dict[str, torch.Tensor]:
    """The losses as the original code computes them: the masked rows gathered through
    ``masks.nonzero()`` (a host sync and a data-dependent shape), then summed. Arguments and result
    as ``SSLAMPretrainer.losses``."""
    clone = cfg.clone_batch
    scale = loss_scale(cfg)
    vi, pi = masks.nonzero(as_tuple=True)
    sample_size = vi.numel()
    pred_masked = pred[vi, pi]
    target_masked = targets["patch"][vi // clone, pi]
    patch_loss = regression_loss(pred_masked, target_masked, scale) * cfg.patch_loss_weight
    cls_target = targets["cls"].repeat_interleave(clone, 0)
    cls_loss = regression_loss(student_cls, cls_target, scale) * (cfg.cls_loss_weight * sample_size)
    if cfg.stage == 2:
        half = masks.shape[0] // 2
        mvi, mpi = masks[half:].nonzero(as_tuple=True)
        srl_loss = regression_loss(pred[half + mvi, mpi], targets["srl"][mvi // clone, mpi], scale) * cfg.srl_loss_weight
    else:
        srl_loss = torch.zeros((), device=pred.device)
    return {
        "loss": (patch_loss + cls_loss + srl_loss) / sample_size,
        "patch_loss": patch_loss.detach(),
        "cls_loss": cls_loss.detach(),
        "srl_loss": srl_loss.detach(),
        "sample_size": torch.tensor(sample_size, device=pred.device),
        "target_var": feature_std(target_masked),
        "pred_var": feature_std(pred_masked),
    }


def _masked_std(moment1: torch.Tensor, moment2: torch.Tensor, count: int) -> torch.Tensor:
    """``feature_std`` of ``count`` rows from their (shifted) sums and sums of squares per channel."""
    if count < 2:
        return torch.zeros((), device=moment1.device)
    var = (moment2 - moment1 * moment1 / count) / (count - 1)
    return torch.sqrt(var.clamp_min(0) + 1e-6).mean()


def dense_losses(pred: torch.Tensor, student_cls: torch.Tensor, targets: Dict[str, torch.Tensor],
                 masks: torch.Tensor, cfg: SSLAMConfig, num_masked: int,
                 masked_regression: Callable, stats: bool = True) -> Dict[str, torch.Tensor]:
    """The losses of ``gathered_losses`` from the dense tensors: every view masks ``num_masked``
    patches (a python int, so sample_size is static), each term a masked-weighted sum
    (``masked_regression``: no nonzero, no gather, no host sync); with ``stats``, target_var /
    pred_var from the masked moments (without, neither is computed nor returned: the trainer asks
    for them on logging steps only). Same values as ``gathered_losses`` up to fp32 summation order."""
    clone = cfg.clone_batch
    scale = loss_scale(cfg)
    V, P, D = pred.shape
    sample_size = V * num_masked
    weights = masks.to(torch.float32)
    shift = pred.detach()[0, 0].float()
    sq, m1, m2 = masked_regression(pred, targets["patch"], weights, clone, shift)
    patch_loss = sq * (scale * cfg.patch_loss_weight)
    cls_target = targets["cls"].repeat_interleave(clone, 0)
    cls_loss = regression_loss(student_cls, cls_target, scale) * (cfg.cls_loss_weight * sample_size)
    if cfg.stage == 2:
        half = V // 2
        srl_sq = masked_regression(pred[half:], targets["srl"], weights[half:], clone, shift)[0]
        srl_loss = srl_sq * (scale * cfg.srl_loss_weight)
    else:
        srl_loss = torch.zeros((), device=pred.device)
    out = {
        "loss": (patch_loss + cls_loss + srl_loss) / sample_size,
        "patch_loss": patch_loss.detach(),
        "cls_loss": cls_loss.detach(),
        "srl_loss": srl_loss.detach(),
        "sample_size": torch.full((), sample_size, dtype=torch.int64, device=pred.device),
    }
    if stats:
        with torch.no_grad():
            target = targets["patch"].float()
            counts = weights.view(-1, clone, P).sum(1)[..., None]  # views of each input masking each patch
            t = target - target[0, 0]
            out["target_var"] = _masked_std((t * counts).sum((0, 1)), (t * t * counts).sum((0, 1)), sample_size)
            out["pred_var"] = _masked_std(m1, m2, sample_size)
    return out
