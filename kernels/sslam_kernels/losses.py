"""The masked regression loss of the student's predictions from dense tensors (docs/method.md §6).

Every view masks the same number of patches, so the loss is a masked-weighted sum over the dense
[V, P, D] predictions: no ``nonzero``, no gather, no data-dependent shape, no host sync.
``masked_regression`` returns, in one read of the predictions,

    loss = sum_{v, p} w[v, p] * sum_d (pred[v, p, d] - target[v // clone, p, d])^2   (fp32)
    s1[d] = sum_{v, p} w[v, p] * (pred[v, p, d] - shift[d])
    s2[d] = sum_{v, p} w[v, p] * (pred[v, p, d] - shift[d])^2

(the masked moments of the predictions, for the pred_var log, shifted by any row ``shift`` to
keep the one-pass variance exact in fp32). The loss is differentiable w.r.t. pred; the backward
writes grad_pred = 2 * g * w * (pred - target) in pred's dtype, in one pass.
"""
from typing import Optional, Tuple

import torch

from ._triton import tl, triton, triton_available, use_triton_for

_empty = torch.empty  # every kernel output is allocated here (tests poison it)


def masked_regression_reference(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, clone: int = 1,
                                shift: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain PyTorch ``masked_regression`` (same arguments, same results)."""
    V, P, D = pred.shape
    diff = pred.view(V // clone, clone, P, D).float() - target.float()[:, None]
    loss = (diff.square().sum(-1) * weights.view(V // clone, clone, P).float()).sum()
    with torch.no_grad():
        x = pred.detach().float() - (0.0 if shift is None else shift.float())
        w = weights.float()[..., None]
        s1 = (x * w).sum((0, 1))
        s2 = (x.square() * w).sum((0, 1))
    return loss, s1, s2


def masked_regression(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, clone: int = 1,
                      shift: Optional[torch.Tensor] = None,
                      use_triton: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked squared error and masked moments of ``pred`` (module docstring).

    pred: [V, P, D] (fp32 / bf16 / fp16); target: [V // clone, P, D] (view v uses target
    v // clone); weights: [V, P] (e.g. the masks as floats); shift: [D] or None (zeros).
    use_triton: None = Triton for CUDA tensors (reference otherwise); True / False forces.
    Returns (loss fp32 scalar, s1 fp32 [D], s2 fp32 [D]); only loss has a gradient (w.r.t. pred).
    """
    V, P, D = pred.shape
    if V % clone or target.shape != (V // clone, P, D) or weights.shape != (V, P):
        raise ValueError(f"pred {tuple(pred.shape)}, target {tuple(target.shape)}, weights "
                         f"{tuple(weights.shape)} and clone {clone} do not match")
    use_triton = use_triton_for(use_triton, pred, "masked_regression")
    if not use_triton:
        return masked_regression_reference(pred, target, weights, clone, shift)
    shift = torch.zeros(D, dtype=torch.float32, device=pred.device) if shift is None else shift.detach().float()
    return _masked_regression_op(pred, target, weights, shift, clone)


BLOCK_P = 32


def _block_d(D: int) -> int:
    return min(128, triton.next_power_of_2(D))


if triton_available:

    @triton.jit
    def _masked_regression_kernel(pred_ptr, target_ptr, w_ptr, shift_ptr, loss_ptr, s1_ptr, s2_ptr, P,
                                  D: tl.constexpr, CLONE: tl.constexpr, BLOCK_P: tl.constexpr,
                                  BLOCK_D: tl.constexpr):
        # One program: rows [p0, p0 + BLOCK_P) of view v; writes its partial loss and moments.
        v = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        prog = v * tl.num_programs(1) + blk
        p = blk * BLOCK_P + tl.arange(0, BLOCK_P)
        pm = p < P
        w = tl.load(w_ptr + v * P + p, mask=pm, other=0.0).to(tl.float32)
        pred_row = pred_ptr + (v * P + p) * D
        target_row = target_ptr + ((v // CLONE) * P + p) * D
        loss = tl.zeros((BLOCK_P,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dm = d < D
            m = pm[:, None] & dm[None, :]
            x = tl.load(pred_row[:, None] + d[None, :], mask=m, other=0.0).to(tl.float32)
            t = tl.load(target_row[:, None] + d[None, :], mask=m, other=0.0).to(tl.float32)
            diff = x - t
            loss += tl.sum(diff * diff, axis=1)
            xs = tl.where(m, x - tl.load(shift_ptr + d, mask=dm, other=0.0)[None, :], 0.0)
            tl.store(s1_ptr + prog * D + d, tl.sum(xs * w[:, None], axis=0), mask=dm)
            tl.store(s2_ptr + prog * D + d, tl.sum(xs * xs * w[:, None], axis=0), mask=dm)
        tl.store(loss_ptr + prog, tl.sum(loss * w, axis=0))

    @triton.jit
    def _masked_regression_backward_kernel(grad_ptr, g_ptr, pred_ptr, target_ptr, w_ptr, P,
                                           D: tl.constexpr, CLONE: tl.constexpr, BLOCK_P: tl.constexpr,
                                           BLOCK_D: tl.constexpr):
        v = tl.program_id(0).to(tl.int64)
        p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        pm = p < P
        coef = 2.0 * tl.load(g_ptr).to(tl.float32) * tl.load(w_ptr + v * P + p, mask=pm, other=0.0).to(tl.float32)
        row = (v * P + p) * D
        target_row = ((v // CLONE) * P + p) * D
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            m = pm[:, None] & (d < D)[None, :]
            x = tl.load(pred_ptr + row[:, None] + d[None, :], mask=m, other=0.0).to(tl.float32)
            t = tl.load(target_ptr + target_row[:, None] + d[None, :], mask=m, other=0.0).to(tl.float32)
            tl.store(grad_ptr + row[:, None] + d[None, :], (coef[:, None] * (x - t)).to(grad_ptr.dtype.element_ty),
                     mask=m)


@torch.library.custom_op("sslam_kernels::masked_regression", mutates_args=())
def _masked_regression_op(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, shift: torch.Tensor,
                          clone: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    V, P, D = pred.shape
    blocks = triton.cdiv(P, BLOCK_P)
    loss = _empty(V * blocks, dtype=torch.float32, device=pred.device)
    s1 = _empty(V * blocks, D, dtype=torch.float32, device=pred.device)
    s2 = _empty(V * blocks, D, dtype=torch.float32, device=pred.device)
    if loss.numel():
        _masked_regression_kernel[(V, blocks)](
            pred.contiguous(), target.contiguous(), weights.contiguous(), shift.contiguous(), loss, s1, s2, P,
            D=D, CLONE=clone, BLOCK_P=BLOCK_P, BLOCK_D=_block_d(D), num_warps=4)
    return loss.sum(), s1.sum(0), s2.sum(0)


@_masked_regression_op.register_fake
def _(pred, target, weights, shift, clone):
    D = pred.shape[2]
    return (pred.new_empty((), dtype=torch.float32), pred.new_empty(D, dtype=torch.float32),
            pred.new_empty(D, dtype=torch.float32))


@torch.library.custom_op("sslam_kernels::masked_regression_backward", mutates_args=())
def _masked_regression_backward_op(grad_loss: torch.Tensor, pred: torch.Tensor, target: torch.Tensor,
                                   weights: torch.Tensor, clone: int) -> torch.Tensor:
    V, P, D = pred.shape
    pred = pred.contiguous()
    grad = _empty(pred.shape, dtype=pred.dtype, device=pred.device)
    if grad.numel():
        _masked_regression_backward_kernel[(V, triton.cdiv(P, BLOCK_P))](
            grad, grad_loss.float().contiguous(), pred, target.contiguous(), weights.contiguous(), P,
            D=D, CLONE=clone, BLOCK_P=BLOCK_P, BLOCK_D=_block_d(D), num_warps=4)
    return grad


@_masked_regression_backward_op.register_fake
def _(grad_loss, pred, target, weights, clone):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _masked_regression_setup(ctx, inputs, output):
    pred, target, weights, _, clone = inputs
    ctx.save_for_backward(pred, target, weights)
    ctx.clone = clone


def _masked_regression_backward(ctx, grad_loss, grad_s1, grad_s2):
    pred, target, weights = ctx.saved_tensors
    grad = _masked_regression_backward_op(grad_loss, pred, target, weights, ctx.clone) if ctx.needs_input_grad[0] else None
    return grad, None, None, None, None


_masked_regression_op.register_autograd(_masked_regression_backward, setup_context=_masked_regression_setup)
