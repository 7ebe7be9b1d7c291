"""sslam_kernels: fused kernels for audio self-supervised learning (torch + triton only)."""
from .ema import ema_update_foreach, ema_update_reference
from .masking import inverse_block_mask_reference, mask_counts

__all__ = [
    "ema_update_foreach",
    "ema_update_reference",
    "inverse_block_mask_reference",
    "mask_counts",
]
