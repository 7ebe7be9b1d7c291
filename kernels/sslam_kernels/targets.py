"""Layer-averaged teacher targets (docs/method.md §5), without materialising K normalised copies.

For K layer outputs [N, T, D]: instance-norm each layer over T per channel (no affine, biased
variance), average the K results, then LayerNorm over D (no affine). The fused kernel holds one
[T, BLOCK_D] column strip of a clip in registers, reads each layer exactly once and writes the
fp32 average once; the LayerNorm over D is torch's own single-pass kernel. Teacher targets take no
gradient, so there is no backward.
"""
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from ._triton import tl, triton, triton_available, use_triton_for

_MAX_TILE = 8192  # elements of the [T, BLOCK_D] strip held per program
_empty = torch.empty  # every kernel output is allocated here (tests poison it)


def layer_averaged_target_reference(layers: Sequence[torch.Tensor], eps_instance: float = 1e-5,
                                    eps_layer: float = 1e-5) -> torch.Tensor:
    """Plain PyTorch: K normalised fp32 copies, summed, averaged, LayerNorm'd."""
    total = None
    for layer in layers:
        normed = F.instance_norm(layer.float().transpose(1, 2), eps=eps_instance).transpose(1, 2)
        total = normed if total is None else total + normed
    y = total / len(layers)
    return F.layer_norm(y, y.shape[-1:], eps=eps_layer)


if triton_available:

    @triton.jit
    def _instance_norm_average_kernel(out_ptr, layer_ptrs, T, D, s_n, s_t, s_d, eps, inv_k,
                                      K: tl.constexpr, IN_DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
                                      BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        t = tl.arange(0, BLOCK_T)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        m = (t < T)[:, None] & (d < D)[None, :]
        offs = n * s_n + t[:, None].to(tl.int64) * s_t + d[None, :] * s_d
        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for k in range(K):
            base = tl.load(layer_ptrs + k).to(tl.pointer_type(IN_DTYPE))
            if ALIGNED:
                base = tl.multiple_of(base, 16)
            x = tl.load(base + offs, mask=m, other=0.0).to(tl.float32)
            mean = tl.sum(x, axis=0) / T
            xc = tl.where(m, x - mean[None, :], 0.0)
            var = tl.sum(xc * xc, axis=0) / T
            acc += xc * tl.rsqrt(var + eps)[None, :]
        out_offs = (n * T + t[:, None]) * D + d[None, :]
        tl.store(out_ptr + out_offs, acc * inv_k, mask=m)


_TL = {}
if triton_available:
    _TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _fits_kernel(layers: Sequence[torch.Tensor]) -> bool:
    first = layers[0]
    return (first.dim() == 3 and first.dtype in _TL
            and triton.next_power_of_2(first.shape[1]) <= _MAX_TILE // 2
            and all(x.shape == first.shape and x.dtype == first.dtype and x.stride() == first.stride()
                    and x.device == first.device for x in layers))


@torch.library.custom_op("sslam_kernels::instance_norm_average", mutates_args=())
def instance_norm_average_triton(layers: List[torch.Tensor], eps_instance: float = 1e-5) -> torch.Tensor:
    """The mean over K layers of the instance-normalised layers, fp32 [N, T, D] (one launch).

    A ``torch.library`` op (no gradient: teacher targets), so it compiles with torch.compile."""
    layers = list(layers)
    N, T, D = layers[0].shape
    out = _empty(N, T, D, dtype=torch.float32, device=layers[0].device)
    if out.numel() == 0:
        return out
    addresses = [x.data_ptr() for x in layers]
    table = torch.tensor(addresses, dtype=torch.int64)
    if out.is_cuda:  # pinned, so the copy is asynchronous (no host sync in the step)
        table = table.pin_memory().to(out.device, non_blocking=True)
    block_t = triton.next_power_of_2(T)
    block_d = max(1, min(32, _MAX_TILE // block_t, triton.next_power_of_2(D)))
    _instance_norm_average_kernel[(N, triton.cdiv(D, block_d))](
        out, table, T, D, *layers[0].stride(), eps_instance, 1.0 / len(layers),
        K=len(layers), IN_DTYPE=_TL[layers[0].dtype], ALIGNED=all(a % 16 == 0 for a in addresses),
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4)
    return out


@instance_norm_average_triton.register_fake
def _(layers, eps_instance=1e-5):
    return layers[0].new_empty(layers[0].shape, dtype=torch.float32)


@torch.no_grad()
def layer_averaged_target(layers: Sequence[torch.Tensor], eps_instance: float = 1e-5,
                          eps_layer: float = 1e-5, use_triton: Optional[bool] = None) -> torch.Tensor:
    """Patch targets from K teacher layers.

    layers: list of K tensors [N, T, D] (fp32 / bf16 / fp16; any strides, e.g. r[:, 1:] with the
        CLS row sliced off). The fused path needs them to share shape, dtype and strides and
        T <= 4096; otherwise the reference runs.
    eps_instance: instance-norm epsilon (over T, per channel, biased variance, no affine).
    eps_layer: LayerNorm epsilon (over D, no affine).
    use_triton: None = Triton for CUDA tensors (reference otherwise); True / False forces.
    Returns fp32 [N, T, D]. No gradient (teacher targets).
    """
    layers = list(layers)
    if not layers:
        raise ValueError("layer_averaged_target needs at least one layer")
    use_triton = use_triton_for(use_triton, layers[0], "layer_averaged_target")
    if not (use_triton and _fits_kernel(layers)):
        return layer_averaged_target_reference(layers, eps_instance, eps_layer)
    y = instance_norm_average_triton(layers, eps_instance)
    return F.layer_norm(y, y.shape[-1:], eps=eps_layer)
