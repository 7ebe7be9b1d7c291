"""fp32 Linear layers on x86 CPUs through oneDNN's matrix product, forward and backward.

torch's x86 CPU wheels compute ``F.linear`` / ``mm`` in fp32 through MKL, whose GEMM ran at
190-220 GFLOP/s on the AMD EPYC development machine against oneDNN's 350-500 on ViT-B's shapes
(``torch.ops.mkldnn._linear_pointwise``, the op inductor's CPU lowering uses; benchmarks/RESULTS.md).
``linear`` runs the same maths through oneDNN where ``applies`` (an x86 CPU, fp32 operands, no
autocast, not inside ``torch.compile``, which lowers GEMMs itself) and is ``F.linear`` elsewhere.
Its backward takes the input and weight gradients from oneDNN too (the residual gradient of
``model._ResidualLinear`` added inside the GEMM). The results differ from MKL's by summation order
only.
"""
import functools
import platform
from typing import Optional

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True on x86 (where it was measured against MKL) with a torch that has oneDNN's linear op."""
    return (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """fp32 operands on the CPU, no autocast, and eager: not inside ``torch.compile`` / ``torch.export``
    (which lower GEMMs themselves), a TorchScript trace or an ONNX export (which cannot hold the op)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing() and not torch.jit.is_scripting() and not torch.onnx.is_in_onnx_export()
            and available())


def applies_without_grad(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """``applies`` and no gradient is wanted (inference, the teachers' passes): the fused epilogues
    of ``matmul`` have no backward."""
    return applies(x, params[0]) and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, *params)))


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, gelu: bool = False,
           add: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ weight^T (+ bias), then GELU (exact) when ``gelu``, or + ``add`` (same shape as the
    output): one oneDNN call, no autograd."""
    op = torch.ops.mkldnn._linear_pointwise
    if add is not None:
        return op.binary(x, add, weight, bias, "add")
    if gelu:
        return op(x, weight, bias, "gelu", [], "none")
    return op(x, weight, bias, "none", [], "")


def grad_input(grad_y: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """grad_y @ weight (+ residual), for grad_y [M, out] and weight [out, in]."""
    return matmul(grad_y, weight.t(), add=residual)


def grad_weight(grad_y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """grad_y^T @ x, for grad_y [M, out] and x [M, in]: the weight's gradient [out, in]."""
    return matmul(grad_y.t(), x.t())


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return matmul(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        gy = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_input(gy, weight).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = grad_weight(gy, x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = gy.sum(0)
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN (forward and backward) where ``applies``."""
    if not applies(x, weight):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return _Linear.apply(x, weight, bias)
    return matmul(x, weight, bias)
