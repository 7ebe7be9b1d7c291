"""Teacher targets and the losses of EAT (stage 1) and SSLAM (stage 2), docs/method.md §5-7."""
import torch


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
