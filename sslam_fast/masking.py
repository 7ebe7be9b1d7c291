"""Masking of student views (docs/method.md §4): which patches each view keeps.

Mask generation and the gather/scatter of visible patches live in ``sslam_kernels`` (GPU kernels
with PyTorch references); this module checks a given [V, P] mask and turns it into the index form
those steps use.
"""
import torch

from sslam_kernels import keep_index_from_mask


def visible_index(masks: torch.Tensor) -> torch.Tensor:
    """[V, P] bool masks (True = masked) -> [V, K] ascending indices of the visible patches.

    Every view must keep the same number K of patches (the exact counts of docs/method.md §4 guarantee it).
    """
    if masks.dtype != torch.bool or masks.dim() != 2:
        raise ValueError(f"masks must be a bool tensor [V, P], got {masks.dtype} {list(masks.shape)}")
    kept = (~masks).sum(dim=1)
    if kept.numel() and bool((kept != kept[0]).any()):
        raise ValueError(
            f"every view must keep the same number of patches; got counts from {int(kept.min())} to {int(kept.max())}"
        )
    return keep_index_from_mask(masks, int(kept[0]) if kept.numel() else 0)
