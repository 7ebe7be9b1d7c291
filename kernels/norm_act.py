"""Elementwise epilogues in one pass each way, exact (erf) GELU, computed in fp32 and rounded once.

- ``norm_gelu_residual``: the decoder's per-layer epilogue (docs/method.md §6), out = h +
  GELU(LayerNorm(y)), LayerNorm over the last (channel) dim without affine. Forward reads y and h
  and writes out (plus fp32 mean and rstd per row); backward reads the output gradient and y and
  writes y's gradient (h's gradient is the output gradient itself). Unfused, LayerNorm, GELU and
  the residual add read and write every element 7 times forward and 9 times backward; fused, 3
  and 3.
- ``bias_gelu``: the encoder MLP's GELU(h + bias) after a bias-free matmul; its backward writes
  h's gradient and reduces the bias gradient in the same pass (unfused, the bias gradient is one
  more full read of the [tokens, 4D] gradient).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._triton import tl, triton, triton_available

_empty = torch.empty  # every kernel output is allocated here (tests poison it)
BLOCK_R = 4


def norm_gelu_residual_reference(y: torch.Tensor, h: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Plain PyTorch: LayerNorm in y's dtype with fp32 statistics (autocast off), GELU, add."""
    with torch.autocast(y.device.type, enabled=False):
        return h + F.gelu(F.layer_norm(y, y.shape[-1:], eps=eps))


if triton_available:

    @triton.jit
    def _norm_gelu_residual_kernel(out_ptr, mean_ptr, rstd_ptr, y_ptr, h_ptr, R, eps,
                                   D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        d = tl.arange(0, BLOCK_D)
        rm = r < R
        m = rm[:, None] & (d < D)[None, :]
        offs = r[:, None].to(tl.int64) * D + d[None, :]
        y = tl.load(y_ptr + offs, mask=m, other=0.0).to(tl.float32)
        mean = tl.sum(y, axis=1) / D
        yc = tl.where(m, y - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(yc * yc, axis=1) / D + eps)
        z = yc * rstd[:, None]
        act = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
        h = tl.load(h_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (h + act).to(out_ptr.dtype.element_ty), mask=m)
        tl.store(mean_ptr + r, mean, mask=rm)
        tl.store(rstd_ptr + r, rstd, mask=rm)

    @triton.jit
    def _norm_gelu_residual_backward_kernel(grad_y_ptr, g_ptr, y_ptr, mean_ptr, rstd_ptr, R,
                                            D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        d = tl.arange(0, BLOCK_D)
        rm = r < R
        m = rm[:, None] & (d < D)[None, :]
        offs = r[:, None].to(tl.int64) * D + d[None, :]
        mean = tl.load(mean_ptr + r, mask=rm, other=0.0)
        rstd = tl.load(rstd_ptr + r, mask=rm, other=0.0)
        y = tl.load(y_ptr + offs, mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
        z = tl.where(m, (y - mean[:, None]) * rstd[:, None], 0.0)
        dgelu = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
        dz = tl.where(m, g * dgelu, 0.0)
        c1 = tl.sum(dz, axis=1) / D
        c2 = tl.sum(dz * z, axis=1) / D
        grad = (dz - c1[:, None] - z * c2[:, None]) * rstd[:, None]
        tl.store(grad_y_ptr + offs, grad.to(grad_y_ptr.dtype.element_ty), mask=m)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


@torch.library.custom_op("sslam_kernels::norm_gelu_residual", mutates_args=())
def _norm_gelu_residual_op(y: torch.Tensor, h: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    D = y.shape[-1]
    y2, h2 = _rows(y), _rows(h)
    R = y2.shape[0]
    out = _empty(R, D, dtype=torch.promote_types(y.dtype, h.dtype), device=y.device)
    mean = _empty(R, dtype=torch.float32, device=y.device)
    rstd = _empty(R, dtype=torch.float32, device=y.device)
    if out.numel():
        _norm_gelu_residual_kernel[(triton.cdiv(R, BLOCK_R),)](
            out, mean, rstd, y2, h2, R, eps, D=D, BLOCK_R=BLOCK_R, BLOCK_D=triton.next_power_of_2(D), num_warps=4)
    return out.view(y.shape), mean, rstd


@_norm_gelu_residual_op.register_fake
def _(y, h, eps):
    R = y.numel() // y.shape[-1] if y.shape[-1] else 0
    return (y.new_empty(y.shape, dtype=torch.promote_types(y.dtype, h.dtype)),
            y.new_empty(R, dtype=torch.float32), y.new_empty(R, dtype=torch.float32))


@torch.library.custom_op("sslam_kernels::norm_gelu_residual_backward", mutates_args=())
def _norm_gelu_residual_backward_op(grad_out: torch.Tensor, y: torch.Tensor, mean: torch.Tensor,
                                    rstd: torch.Tensor) -> torch.Tensor:
    D = y.shape[-1]
    y2, g2 = _rows(y), _rows(grad_out)
    R = y2.shape[0]
    grad = _empty(R, D, dtype=y.dtype, device=y.device)
    if grad.numel():
        _norm_gelu_residual_backward_kernel[(triton.cdiv(R, BLOCK_R),)](
            grad, g2, y2, mean, rstd, R, D=D, BLOCK_R=BLOCK_R, BLOCK_D=triton.next_power_of_2(D), num_warps=4)
    return grad.view(y.shape)


@_norm_gelu_residual_backward_op.register_fake
def _(grad_out, y, mean, rstd):
    return y.new_empty(y.shape)


def _setup(ctx, inputs, output):
    y, h, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(y, mean, rstd)
    ctx.h_dtype = h.dtype


def _backward(ctx, grad_out, grad_mean, grad_rstd):
    y, mean, rstd = ctx.saved_tensors
    grad_y = _norm_gelu_residual_backward_op(grad_out, y, mean, rstd) if ctx.needs_input_grad[0] else None
    grad_h = grad_out.to(ctx.h_dtype) if ctx.needs_input_grad[1] else None
    return grad_y, grad_h, None


_norm_gelu_residual_op.register_autograd(_backward, setup_context=_setup)


def norm_gelu_residual(y: torch.Tensor, h: torch.Tensor, eps: float = 1e-5,
                       use_triton: Optional[bool] = None) -> torch.Tensor:
    """h + GELU(LayerNorm(y)) over the last dim (no affine), in one pass each way.

    y, h: [..., D] of the same shape (fp32 / bf16 / fp16; y's rows are made contiguous).
    use_triton: None = Triton for CUDA tensors (the reference otherwise); True / False forces.
    Returns the promoted dtype of y and h, shaped like y; differentiable w.r.t. y and h.
    """
    if y.shape != h.shape:
        raise ValueError(f"y {tuple(y.shape)} and h {tuple(h.shape)} must have the same shape")
    if use_triton is None:
        use_triton = y.is_cuda and triton_available
    if not use_triton:
        return norm_gelu_residual_reference(y, h, eps)
    return _norm_gelu_residual_op(y, h, eps)[0]


def bias_gelu_reference(h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: GELU(h + bias) in h's dtype."""
    return F.gelu(h + bias.to(h.dtype))


BLOCK_F = 128
BLOCK_RB = 32

if triton_available:

    @triton.jit
    def _bias_gelu_kernel(out_ptr, h_ptr, b_ptr, R, F, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        fm = f < F
        m = (r < R)[:, None] & fm[None, :]
        offs = r[:, None].to(tl.int64) * F + f[None, :]
        x = tl.load(h_ptr + offs, mask=m, other=0.0).to(tl.float32) + tl.load(b_ptr + f, mask=fm, other=0.0).to(tl.float32)[None, :]
        act = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
        tl.store(out_ptr + offs, act.to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _bias_gelu_backward_kernel(grad_h_ptr, partial_ptr, g_ptr, h_ptr, b_ptr, R, F,
                                   BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        fm = f < F
        m = (r < R)[:, None] & fm[None, :]
        offs = r[:, None].to(tl.int64) * F + f[None, :]
        x = tl.load(h_ptr + offs, mask=m, other=0.0).to(tl.float32) + tl.load(b_ptr + f, mask=fm, other=0.0).to(tl.float32)[None, :]
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
        dgelu = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
        grad = tl.where(m, g * dgelu, 0.0)
        tl.store(grad_h_ptr + offs, grad.to(grad_h_ptr.dtype.element_ty), mask=m)
        tl.store(partial_ptr + tl.program_id(0).to(tl.int64) * F + f, tl.sum(grad, axis=0), mask=fm)


@torch.library.custom_op("sslam_kernels::bias_gelu", mutates_args=())
def _bias_gelu_op(h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    h2 = _rows(h)
    R, F_ = h2.shape
    out = _empty(R, F_, dtype=h.dtype, device=h.device)
    if out.numel():
        _bias_gelu_kernel[(triton.cdiv(R, BLOCK_RB), triton.cdiv(F_, BLOCK_F))](
            out, h2, bias.contiguous(), R, F_, BLOCK_R=BLOCK_RB, BLOCK_F=BLOCK_F, num_warps=4)
    return out.view(h.shape)


@_bias_gelu_op.register_fake
def _(h, bias):
    return h.new_empty(h.shape)


@torch.library.custom_op("sslam_kernels::bias_gelu_backward", mutates_args=())
def _bias_gelu_backward_op(grad_out: torch.Tensor, h: torch.Tensor, bias: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    h2, g2 = _rows(h), _rows(grad_out)
    R, F_ = h2.shape
    blocks = triton.cdiv(R, BLOCK_RB)
    grad_h = _empty(R, F_, dtype=h.dtype, device=h.device)
    partial = _empty(blocks, F_, dtype=torch.float32, device=h.device)
    if grad_h.numel():
        _bias_gelu_backward_kernel[(blocks, triton.cdiv(F_, BLOCK_F))](
            grad_h, partial, g2, h2, bias.contiguous(), R, F_, BLOCK_R=BLOCK_RB, BLOCK_F=BLOCK_F, num_warps=4)
    return grad_h.view(h.shape), partial.sum(0).to(bias.dtype)


@_bias_gelu_backward_op.register_fake
def _(grad_out, h, bias):
    return h.new_empty(h.shape), bias.new_empty(bias.shape)


def _bias_gelu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _bias_gelu_backward(ctx, grad_out):
    h, bias = ctx.saved_tensors
    grad_h, grad_b = _bias_gelu_backward_op(grad_out, h, bias)
    return grad_h if ctx.needs_input_grad[0] else None, grad_b if ctx.needs_input_grad[1] else None


_bias_gelu_op.register_autograd(_bias_gelu_backward, setup_context=_bias_gelu_setup)


def bias_gelu(h: torch.Tensor, bias: torch.Tensor, use_triton: Optional[bool] = None) -> torch.Tensor:
    """GELU(h + bias) in h's dtype: h [..., F] (a bias-free matmul's output), bias [F].

    use_triton: None = Triton for CUDA tensors (the reference otherwise); True / False forces.
    Differentiable w.r.t. h and bias; the backward reduces the bias gradient in its one pass.
    """
    if bias.shape != h.shape[-1:]:
        raise ValueError(f"bias {tuple(bias.shape)} does not match h {tuple(h.shape)}")
    if use_triton is None:
        use_triton = h.is_cuda and triton_available
    if not use_triton:
        return bias_gelu_reference(h, bias)
    return _bias_gelu_op(h, bias)
