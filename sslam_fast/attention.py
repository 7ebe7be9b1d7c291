"""The one attention function of the encoder: flash-attn when it imports, torch SDPA otherwise.

``eager_attention`` is the plain reference (q k^T, softmax in fp32, v), used for parity tests and
for the reference execution mode.
"""
import torch
import torch.nn.functional as F

try:
    from flash_attn import flash_attn_func as _flash_attn_func
except ImportError:
    _flash_attn_func = None

FLASH_AVAILABLE = _flash_attn_func is not None


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k, v: [B, H, N, Dh] -> [B, H, N, Dh]; scores are softmaxed in fp32."""
    scale = q.shape[-1] ** -0.5
    scores = (q * scale) @ k.transpose(-2, -1)
    weights = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    return weights @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str = "auto") -> torch.Tensor:
    """q, k, v: [B, H, N, Dh] -> [B, H, N, Dh], no mask, no dropout.

    mode: "auto" (flash-attn for fp16/bf16 CUDA inputs when installed, else SDPA), "flash",
    "sdpa" or "eager".
    """
    if mode == "eager":
        return eager_attention(q, k, v)
    use_flash = (
        mode == "flash"
        or (mode == "auto" and FLASH_AVAILABLE and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16))
    )
    if use_flash:
        if not FLASH_AVAILABLE:
            raise RuntimeError("attention mode 'flash' asked for, but flash_attn does not import")
        return _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v)
