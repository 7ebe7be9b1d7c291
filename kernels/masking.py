"""Inverse block masking (SPEC section 4): the PyTorch reference, also the CPU fallback.

A view keeps a few 2-D blocks of patches (grown around random centres), is then adjusted at
random to an exact number of kept patches, and everything else is masked.
"""
from typing import Optional, Tuple

import torch


def mask_counts(num_patches: int, mask_prob: float = 0.8, mask_length: int = 5,
                mask_prob_adjust: float = 0.07) -> Tuple[int, int]:
    """(number of block centres, number of kept patches) per view, as the original computes them."""
    keep_prob = 1 - mask_prob
    num_centres = int(num_patches * ((keep_prob + mask_prob_adjust) / mask_length**2))
    num_keep = int(num_patches * keep_prob)
    return num_centres, num_keep


def inverse_block_mask_reference(
    num_views: int,
    grid: Tuple[int, int],
    mask_prob: float = 0.8,
    mask_length: int = 5,
    mask_prob_adjust: float = 0.07,
    generator: Optional[torch.Generator] = None,
    device=None,
) -> torch.Tensor:
    """Draw inverse block masks for ``num_views`` views of a ``grid = (time, freq)`` patch grid.

    Returns a bool tensor [num_views, time * freq] (time-major), True = masked. Every row has
    exactly ``num_patches - mask_counts(...)[1]`` masked patches.

    Centres are drawn uniformly with replacement; each grows into a ``mask_length`` square
    clamped at the grid edges. The kept set is then trimmed (uniformly among kept) or topped up
    (uniformly among the rest) to the exact count, which is what ranking uniform scores with a
    bonus for block membership does, without a per-view loop.
    """
    rows, cols = grid
    num_patches = rows * cols
    num_centres, num_keep = mask_counts(num_patches, mask_prob, mask_length, mask_prob_adjust)
    kept = torch.zeros(num_views, num_patches, dtype=torch.bool, device=device)
    if num_centres > 0:
        centres = torch.randint(0, num_patches, (num_views, num_centres), generator=generator,
                                device=device)
        offsets = torch.arange(mask_length, device=device) - mask_length // 2
        r = (centres // cols)[:, :, None, None] + offsets[None, None, :, None]
        c = (centres % cols)[:, :, None, None] + offsets[None, None, None, :]
        index = r.clamp(0, rows - 1) * cols + c.clamp(0, cols - 1)
        kept.scatter_(1, index.reshape(num_views, -1), True)
    scores = torch.rand(num_views, num_patches, generator=generator, device=device) + kept.float() * 2
    keep_index = scores.topk(num_keep, dim=1, sorted=False).indices
    masked = torch.ones(num_views, num_patches, dtype=torch.bool, device=device)
    masked.scatter_(1, keep_index, False)
    return masked
