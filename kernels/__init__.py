"""sslam_kernels: fused kernels for audio self-supervised learning (torch + triton only).

Every op dispatches to Triton for CUDA tensors and to its PyTorch reference otherwise.
"""
from .ema import EMAPair, ema_update, ema_update_foreach, ema_update_reference
from .fused_ema import FusedEMA
from .masking import inverse_block_mask_reference, mask_counts

__all__ = [
    "EMAPair",
    "FusedEMA",
    "ema_update",
    "ema_update_foreach",
    "ema_update_reference",
    "inverse_block_mask_reference",
    "mask_counts",
]
