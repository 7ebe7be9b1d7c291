"""Teacher targets and the losses of EAT (stage 1) and SSLAM (stage 2), SPEC 5-7."""
from typing import Sequence

import torch
import torch.nn.functional as F


def layer_averaged_target(layers: Sequence[torch.Tensor], instance_eps: float = 1e-5,
                          layer_eps: float = 1e-5) -> torch.Tensor:
    """K layer outputs [N, T, D] -> fp32 target [N, T, D]: instance-norm each layer over time per
    channel (no affine), average the K layers, then LayerNorm over channels (no affine)."""
    total = None
    for layer in layers:
        normed = F.instance_norm(layer.float().transpose(1, 2), eps=instance_eps).transpose(1, 2)
        total = normed if total is None else total + normed
    y = total / len(layers)
    return F.layer_norm(y, y.shape[-1:], eps=layer_eps)


def source_retention_target(own: torch.Tensor, partner_mixed_rows: torch.Tensor, rows: torch.Tensor,
                            freq_patches: int) -> torch.Tensor:
    """The Source Retention target of SSLAM for the mixtures of a batch.

    own: [B, P, D] each clip's own patch target. partner_mixed_rows: [B, R * freq_patches, D] the
    12-layer target of each clip computed with only its mixed rows (the unmixed windows dropped);
    rows: [P // freq_patches] bool, True for the R mixed rows. For mixture i, clip i-1's features
    are put into the mixed rows of a copy of clip i's target, and the result averaged with clip i's
    target: 0.5 * (target(A_i) + target_with_partner_in_mixed_rows(A_{i-1})).
    """
    B, P, D = own.shape
    partner = torch.roll(partner_mixed_rows, shifts=1, dims=0)
    rebuilt = own.clone().view(B, P // freq_patches, freq_patches, D)
    rebuilt[:, rows] = partner.view(B, -1, freq_patches, D).to(rebuilt.dtype)
    return (own + rebuilt.view(B, P, D)) / 2.0


def regression_loss(pred: torch.Tensor, target: torch.Tensor, scale: float) -> torch.Tensor:
    """Summed scaled squared error in fp32: sum((pred - target)^2) * scale."""
    return ((pred.float() - target.float()) ** 2 * scale).sum()


def feature_std(y: torch.Tensor) -> torch.Tensor:
    """Standard deviation over rows, averaged over channels (target_var / pred_var of the logs)."""
    y = y.detach().float().reshape(-1, y.shape[-1])
    if y.shape[0] < 2:
        return torch.zeros((), device=y.device)
    return torch.sqrt(y.var(dim=0) + 1e-6).mean()
