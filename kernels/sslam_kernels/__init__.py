"""sslam_kernels: fused kernels for audio self-supervised learning (torch + triton only).

Every op dispatches to Triton for CUDA tensors and to its PyTorch reference otherwise.
"""
from .ema import ema_update_reference
from .fused_ema import FusedEMA
from .gather import (decoder_input_gather, decoder_input_gather_reference, decoder_input_scatter,
                     decoder_input_scatter_reference, embed_mask_gather, embed_mask_gather_reference)
from .losses import masked_regression, masked_regression_reference
from .norm_act import (add_layer_norm, add_layer_norm_reference, bias_gelu, bias_gelu_reference, norm_gelu_residual,
                       norm_gelu_residual_reference)
from .targets import layer_averaged_target, layer_averaged_target_reference
from .masking import (inverse_block_mask, inverse_block_mask_reference, keep_index_from_mask,
                      mask_counts)

__all__ = [
    "FusedEMA",
    "add_layer_norm",
    "add_layer_norm_reference",
    "bias_gelu",
    "bias_gelu_reference",
    "decoder_input_gather",
    "decoder_input_gather_reference",
    "decoder_input_scatter",
    "decoder_input_scatter_reference",
    "ema_update_reference",
    "embed_mask_gather",
    "embed_mask_gather_reference",
    "inverse_block_mask",
    "inverse_block_mask_reference",
    "keep_index_from_mask",
    "layer_averaged_target",
    "layer_averaged_target_reference",
    "mask_counts",
    "masked_regression",
    "masked_regression_reference",
    "norm_gelu_residual",
    "norm_gelu_residual_reference",
]
