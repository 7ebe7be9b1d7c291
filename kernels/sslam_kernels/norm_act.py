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
- ``add_layer_norm``: a post-LN block's LayerNorm(x + residual) with affine parameters
  (docs/method.md §3): forward reads x and residual, writes the output and the rounded sum its
  backward needs; backward reads the output gradient and the sum, writes the sum's gradient and
  reduces the weight and bias gradients in the same pass (per-program partial rows, then one
  small column-sum kernel).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._triton import tl, triton, triton_available, use_triton_for

_empty = torch.empty  # every kernel output is allocated here (tests poison it)
BLOCK_R = 4


def norm_gelu_residual_reference(y: torch.Tensor, h: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Plain PyTorch: LayerNorm in y's dtype with fp32 statistics (autocast off), GELU, add."""
    with torch.autocast(y.device.type, enabled=False):
        return h + F.gelu(F.layer_norm(y, y.shape[-1:], eps=eps))


if triton_available:

    @triton.jit
    def _row_tile(tile, R, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """Rows tile * BLOCK_R ... of a contiguous [R, D] matrix, full rows: (rows, row mask,
        element mask, element offsets)."""
        r = tile * BLOCK_R + tl.arange(0, BLOCK_R)
        d = tl.arange(0, BLOCK_D)
        rm = r < R
        m = rm[:, None] & (d < D)[None, :]
        return r, rm, m, r[:, None].to(tl.int64) * D + d[None, :]

    @triton.jit
    def _gelu(z):
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))

    @triton.jit
    def _gelu_grad(z):
        return 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327

    @triton.jit
    def _column_sum_kernel(out_ptr, partial_ptr, P, N, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
        """out[n] = sum over p of partial[p, n] (fp32 [P, N]), accumulated in fp32, stored in out's dtype."""
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for start in range(0, P, BLOCK_P):
            p = start + tl.arange(0, BLOCK_P)
            m = (p < P)[:, None] & (n < N)[None, :]
            acc += tl.sum(tl.load(partial_ptr + p[:, None].to(tl.int64) * N + n[None, :], mask=m, other=0.0), axis=0)
        tl.store(out_ptr + n, acc.to(out_ptr.dtype.element_ty), mask=n < N)

    @triton.jit
    def _norm_gelu_residual_kernel(out_ptr, mean_ptr, rstd_ptr, y_ptr, h_ptr, R, eps,
                                   D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        r, rm, m, offs = _row_tile(tl.program_id(0), R, D, BLOCK_R, BLOCK_D)
        y = tl.load(y_ptr + offs, mask=m, other=0.0).to(tl.float32)
        mean = tl.sum(y, axis=1) / D
        yc = tl.where(m, y - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(yc * yc, axis=1) / D + eps)
        z = yc * rstd[:, None]
        act = _gelu(z)
        h = tl.load(h_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (h + act).to(out_ptr.dtype.element_ty), mask=m)
        tl.store(mean_ptr + r, mean, mask=rm)
        tl.store(rstd_ptr + r, rstd, mask=rm)

    @triton.jit
    def _norm_gelu_residual_backward_kernel(grad_y_ptr, g_ptr, y_ptr, mean_ptr, rstd_ptr, R,
                                            D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        r, rm, m, offs = _row_tile(tl.program_id(0), R, D, BLOCK_R, BLOCK_D)
        mean = tl.load(mean_ptr + r, mask=rm, other=0.0)
        rstd = tl.load(rstd_ptr + r, mask=rm, other=0.0)
        y = tl.load(y_ptr + offs, mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
        z = tl.where(m, (y - mean[:, None]) * rstd[:, None], 0.0)
        dz = tl.where(m, g * _gelu_grad(z), 0.0)
        c1 = tl.sum(dz, axis=1) / D
        c2 = tl.sum(dz * z, axis=1) / D
        grad = (dz - c1[:, None] - z * c2[:, None]) * rstd[:, None]
        tl.store(grad_y_ptr + offs, grad.to(grad_y_ptr.dtype.element_ty), mask=m)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def _column_sums(partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """partial [P, ...] fp32 summed over P into ``dtype`` by one kernel."""
    out = _empty(partial.shape[1:], dtype=dtype, device=partial.device)
    N = out.numel()
    if N:
        _column_sum_kernel[(triton.cdiv(N, 256),)](out, partial, partial.shape[0], N, BLOCK_P=16, BLOCK_N=256,
                                                   num_warps=4)
    return out


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
    ctx.set_materialize_grads(False)  # mean and rstd take no gradient: no zeros made for them


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
    use_triton = use_triton_for(use_triton, y, "norm_gelu_residual")
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
    def _biased_tile(h_ptr, b_ptr, R, F, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
        """The (program 0, program 1) tile of a contiguous [R, F] h plus bias [F], in fp32:
        (columns, column mask, element mask, element offsets, h + bias)."""
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        fm = f < F
        m = (r < R)[:, None] & fm[None, :]
        offs = r[:, None].to(tl.int64) * F + f[None, :]
        x = tl.load(h_ptr + offs, mask=m, other=0.0).to(tl.float32) + tl.load(b_ptr + f, mask=fm, other=0.0).to(tl.float32)[None, :]
        return f, fm, m, offs, x

    @triton.jit
    def _bias_gelu_kernel(out_ptr, h_ptr, b_ptr, R, F, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
        f, fm, m, offs, x = _biased_tile(h_ptr, b_ptr, R, F, BLOCK_R, BLOCK_F)
        tl.store(out_ptr + offs, _gelu(x).to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _bias_gelu_backward_kernel(grad_h_ptr, partial_ptr, g_ptr, h_ptr, b_ptr, R, F,
                                   BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
        f, fm, m, offs, x = _biased_tile(h_ptr, b_ptr, R, F, BLOCK_R, BLOCK_F)
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
        grad = tl.where(m, g * _gelu_grad(x), 0.0)
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
    return grad_h.view(h.shape), _column_sums(partial, bias.dtype) if grad_h.numel() else bias.new_zeros(bias.shape)


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
    use_triton = use_triton_for(use_triton, h, "bias_gelu")
    if not use_triton:
        return bias_gelu_reference(h, bias)
    return _bias_gelu_op(h, bias)


def add_layer_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor] = None,
                             bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    """Plain PyTorch: s = x + residual, then LayerNorm of s in s's dtype with fp32 statistics
    (autocast off; the affine parameters cast to s's dtype)."""
    with torch.autocast(x.device.type, enabled=False):
        s = x + residual
        weight = None if weight is None else weight.to(s.dtype)
        bias = None if bias is None else bias.to(s.dtype)
        return F.layer_norm(s, (int(s.shape[-1]),), weight, bias, eps)


BLOCK_RL = 4

if triton_available:

    @triton.jit
    def _add_layer_norm_kernel(out_ptr, sum_ptr, mean_ptr, rstd_ptr, x_ptr, res_ptr, w_ptr, b_ptr, R, eps,
                               D: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                               SAVE_SUM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        r, rm, m, offs = _row_tile(tl.program_id(0), R, D, BLOCK_R, BLOCK_D)
        s = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32) + tl.load(res_ptr + offs, mask=m, other=0.0).to(tl.float32)
        s = s.to(out_ptr.dtype.element_ty)  # the sum as the unfused add rounds it, normalised and saved
        if SAVE_SUM:
            tl.store(sum_ptr + offs, s, mask=m)
        s = s.to(tl.float32)
        mean = tl.sum(s, axis=1) / D
        sc = tl.where(m, s - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(sc * sc, axis=1) / D + eps)
        y = sc * rstd[:, None]
        d = tl.arange(0, BLOCK_D)
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + d, mask=d < D, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y = y + tl.load(b_ptr + d, mask=d < D, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=m)
        tl.store(mean_ptr + r, mean, mask=rm)
        tl.store(rstd_ptr + r, rstd, mask=rm)

    @triton.jit
    def _add_layer_norm_backward_kernel(grad_s_ptr, partial_ptr, g_ptr, s_ptr, mean_ptr, rstd_ptr, w_ptr, R,
                                        tiles_per_program, D: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """Each program takes tiles_per_program consecutive row tiles and writes one row of partial
        weight and bias gradients (``_column_sum_kernel`` adds them up)."""
        pid = tl.program_id(0)
        d = tl.arange(0, BLOCK_D)
        w = tl.load(w_ptr + d, mask=d < D, other=0.0).to(tl.float32) if HAS_WEIGHT else tl.full((BLOCK_D,), 1.0, tl.float32)
        dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
        db = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for i in range(0, tiles_per_program):
            r, rm, m, offs = _row_tile(pid * tiles_per_program + i, R, D, BLOCK_R, BLOCK_D)
            mean = tl.load(mean_ptr + r, mask=rm, other=0.0)
            rstd = tl.load(rstd_ptr + r, mask=rm, other=0.0)
            g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
            z = tl.where(m, (tl.load(s_ptr + offs, mask=m, other=0.0).to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
            dz = g * w[None, :]
            c1 = tl.sum(dz, axis=1) / D
            c2 = tl.sum(dz * z, axis=1) / D
            grad = (dz - c1[:, None] - z * c2[:, None]) * rstd[:, None]
            tl.store(grad_s_ptr + offs, grad.to(grad_s_ptr.dtype.element_ty), mask=m)
            dw += tl.sum(g * z, axis=0)
            db += tl.sum(g, axis=0)
        row = partial_ptr + pid.to(tl.int64) * (2 * D)  # partial [programs, 2, D]: weight, then bias
        tl.store(row + d, dw, mask=d < D)
        tl.store(row + D + d, db, mask=d < D)


def _backward_programs(device: torch.device, tiles: int) -> int:
    """Programs of a row-reducing backward: a few per SM on a GPU (each writes one partial row)."""
    if device.type == "cuda":
        return max(1, min(tiles, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(tiles, 8))


@torch.library.custom_op("sslam_kernels::add_layer_norm", mutates_args=())
def _add_layer_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], eps: float,
                       save_sum: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    D = x.shape[-1]
    x2, r2 = _rows(x), _rows(residual)
    R = x2.shape[0]
    dtype = torch.promote_types(x.dtype, residual.dtype)
    out = _empty(R, D, dtype=dtype, device=x.device)
    s = _empty(R if save_sum else 0, D, dtype=dtype, device=x.device)
    mean = _empty(R, dtype=torch.float32, device=x.device)
    rstd = _empty(R, dtype=torch.float32, device=x.device)
    if out.numel():
        _add_layer_norm_kernel[(triton.cdiv(R, BLOCK_RL),)](
            out, s if save_sum else out, mean, rstd, x2, r2, x2 if weight is None else weight.contiguous(),
            x2 if bias is None else bias.contiguous(), R, eps, D=D, HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None, SAVE_SUM=save_sum, BLOCK_R=BLOCK_RL, BLOCK_D=triton.next_power_of_2(D),
            num_warps=4)
    return out.view(x.shape), s.view(x.shape) if save_sum else s, mean, rstd


@_add_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps, save_sum):
    D = x.shape[-1]
    R = x.numel() // D if D else 0
    dtype = torch.promote_types(x.dtype, residual.dtype)
    s = x.new_empty(x.shape, dtype=dtype) if save_sum else x.new_empty(0, D, dtype=dtype)
    return (x.new_empty(x.shape, dtype=dtype), s, x.new_empty(R, dtype=torch.float32),
            x.new_empty(R, dtype=torch.float32))


@torch.library.custom_op("sslam_kernels::add_layer_norm_backward", mutates_args=())
def _add_layer_norm_backward_op(grad_out: torch.Tensor, s: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                                weight: Optional[torch.Tensor],
                                param_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(the sum's gradient, [2, D]: the weight's then the bias's gradient, in ``param_dtype``)."""
    D = s.shape[-1]
    s2, g2 = _rows(s), _rows(grad_out)
    R = s2.shape[0]
    tiles = triton.cdiv(R, BLOCK_RL)
    programs = _backward_programs(s.device, tiles)
    grad = _empty(R, D, dtype=s.dtype, device=s.device)
    if not grad.numel():
        return grad.view(s.shape), torch.zeros(2, D, dtype=param_dtype, device=s.device)
    partial = _empty(programs, 2, D, dtype=torch.float32, device=s.device)
    _add_layer_norm_backward_kernel[(programs,)](
        grad, partial, g2, s2, mean, rstd, s2 if weight is None else weight.contiguous(), R,
        triton.cdiv(tiles, programs), D=D, HAS_WEIGHT=weight is not None, BLOCK_R=BLOCK_RL,
        BLOCK_D=triton.next_power_of_2(D), num_warps=4)
    return grad.view(s.shape), _column_sums(partial, param_dtype)


@_add_layer_norm_backward_op.register_fake
def _(grad_out, s, mean, rstd, weight, param_dtype):
    return s.new_empty(s.shape), s.new_empty(2, s.shape[-1], dtype=param_dtype)


def _add_layer_norm_setup(ctx, inputs, output):
    x, residual, weight, bias, _, save_sum = inputs
    _, s, mean, rstd = output
    ctx.save_for_backward(s, mean, rstd, weight)
    ctx.dtypes = (x.dtype, residual.dtype, None if weight is None else weight.dtype,
                  None if bias is None else bias.dtype)
    ctx.saved_sum = save_sum
    ctx.set_materialize_grads(False)  # s, mean and rstd take no gradient: no zeros made for them


def _add_layer_norm_backward(ctx, grad_out, grad_s, grad_mean, grad_rstd):
    if not ctx.saved_sum:
        raise RuntimeError("add_layer_norm ran without saving its sum (no input required a gradient)")
    s, mean, rstd, weight = ctx.saved_tensors
    x_dtype, r_dtype, w_dtype, b_dtype = ctx.dtypes
    grad, sums = _add_layer_norm_backward_op(grad_out, s, mean, rstd, weight, w_dtype or b_dtype or torch.float32)
    dw, db = sums.unbind(0)
    return (grad.to(x_dtype) if ctx.needs_input_grad[0] else None,
            grad.to(r_dtype) if ctx.needs_input_grad[1] else None,
            dw if w_dtype is not None and ctx.needs_input_grad[2] else None,
            db.to(b_dtype) if b_dtype is not None and ctx.needs_input_grad[3] else None, None, None)


_add_layer_norm_op.register_autograd(_add_layer_norm_backward, setup_context=_add_layer_norm_setup)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor] = None,
                   bias: Optional[torch.Tensor] = None, eps: float = 1e-5,
                   use_triton: Optional[bool] = None) -> torch.Tensor:
    """LayerNorm(x + residual) over the last dim, the add fused into the norm (a post-LN block's
    residual join), in the promoted dtype of x and residual with fp32 statistics, also under
    autocast.

    x, residual: [..., D] of the same shape; weight, bias: [D] or None (any float dtype, applied in
    fp32). Forward reads x and residual once and writes the output and, when a gradient is needed,
    the rounded sum for the backward (unfused: the add writes the sum and the norm reads it back).
    The backward writes the sum's gradient (that of x and of residual) and reduces the weight and
    bias gradients in the same pass (torch's LayerNorm backward reads the gradient and its input
    twice for them). use_triton: None = Triton for CUDA tensors (the reference otherwise).
    """
    if x.shape != residual.shape:
        raise ValueError(f"x {tuple(x.shape)} and residual {tuple(residual.shape)} must have the same shape")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != x.shape[-1:]:
            raise ValueError(f"{name} {tuple(p.shape)} does not match the last dim of x {tuple(x.shape)}")
    use_triton = use_triton_for(use_triton, x, "add_layer_norm")
    if not use_triton:
        return add_layer_norm_reference(x, residual, weight, bias, eps)
    save_sum = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, residual, weight, bias))
    return _add_layer_norm_op(x, residual, weight, bias, eps, save_sum)[0]
