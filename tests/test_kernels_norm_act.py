"""sslam_kernels.norm_gelu_residual, bias_gelu and add_layer_norm (Triton through the interpreter
on CPU) against a float64 oracle and their references, forward and backward, odd shapes,
per-dtype tolerances: the kernel's error within twice the reference's plus 1e-5 (fp32) / 1e-2
(bf16) of the value. On a CUDA machine every tensor is on the GPU (real Triton, real bf16)."""
import pytest
import torch
import torch.nn.functional as F

from sslam_kernels import (add_layer_norm, add_layer_norm_reference, bias_gelu, bias_gelu_reference,
                           norm_gelu_residual, norm_gelu_residual_reference)

SHAPES = [(3, 5, 48), (2, 3, 4, 33), (7, 130), (1, 1, 8)]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def randn(shape, g, dtype=torch.float32):
    return torch.randn(shape, generator=g).to(DEVICE, dtype)


def inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    y = (randn(shape, g) * 2 + 0.3).to(dtype).requires_grad_()
    h = randn(shape, g, dtype).requires_grad_()
    return y, h, randn(shape, g)


def oracle(y, h, grad, eps):
    yd, hd = (t.detach().double().requires_grad_() for t in (y, h))
    out = hd + F.gelu(F.layer_norm(yd, yd.shape[-1:], eps=eps))
    out.backward(grad.double())
    return out.detach(), yd.grad, hd.grad


def assert_as_close_as_reference(got, exact, reference, dtype, elementwise=True):
    """Each error within twice the reference's plus the dtype's allowance, element by element, or
    (``elementwise=False``, for gradients reduced over rows, whose rounding errors add up in a
    different order) in the max norm."""
    for g, want, plain in zip(got, exact, reference):
        err, ref_err = (g.double() - want).abs(), (plain.double() - want).abs()
        if not elementwise:
            err, ref_err, want = err.max(), ref_err.max(), want.abs().max()
        bound = 2 * ref_err + (1e-5 if dtype == torch.float32 else 1e-2) * (1 + want.abs())
        assert bool((err <= bound).all()), float((err - bound).max())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_forward_and_backward(shape, dtype):
    y, h, grad = inputs(shape, dtype, seed=sum(shape))
    out = norm_gelu_residual(y, h, 1e-5, use_triton=True)
    assert out.dtype == dtype and out.shape == y.shape
    out.backward(grad.to(dtype))
    exact = oracle(y, h, grad, 1e-5)
    yr, hr = (t.detach().clone().requires_grad_() for t in (y, h))
    ref = norm_gelu_residual_reference(yr, hr, 1e-5)
    ref.backward(grad.to(dtype))
    assert_as_close_as_reference((out.detach(), y.grad, h.grad), exact, (ref.detach(), yr.grad, hr.grad), dtype)


def test_fp32_kernel_is_close_to_the_reference_and_checks_shapes():
    y, h, _ = inputs((4, 9, 40), torch.float32, seed=3)
    torch.testing.assert_close(norm_gelu_residual(y, h, use_triton=True), norm_gelu_residual_reference(y, h),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        norm_gelu_residual(y, h[:2])
    torch.library.opcheck(torch.ops.sslam_kernels.norm_gelu_residual.default, (y, h, 1e-5))


@pytest.mark.parametrize("shape", [(3, 5, 48), (7, 130), (2, 33, 257)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_gelu_forward_and_backward(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    h = (randn(shape, g) * 2).to(dtype).requires_grad_()
    bias = (randn(shape[-1], g) * 0.5).requires_grad_()
    grad = randn(shape, g)
    out = bias_gelu(h, bias, use_triton=True)
    assert out.dtype == dtype
    out.backward(grad.to(dtype))
    hd, bd = h.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    exact = F.gelu(hd + bd)
    exact.backward(grad.double())
    hr, br = h.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    ref = bias_gelu_reference(hr, br)
    ref.backward(grad.to(dtype))
    assert_as_close_as_reference((out.detach(), h.grad, bias.grad), (exact.detach(), hd.grad, bd.grad),
                                 (ref.detach(), hr.grad, br.grad), dtype)
    torch.library.opcheck(torch.ops.sslam_kernels.bias_gelu.default, (h.detach().float().requires_grad_(), bias))


@pytest.mark.parametrize("shape", [(3, 5, 48), (2, 3, 4, 33), (41, 130), (1, 1, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_add_layer_norm_forward_and_backward(shape, dtype, affine):
    g = torch.Generator().manual_seed(sum(shape) + len(affine))
    x = (randn(shape, g) * 2 + 0.3).to(dtype).requires_grad_()
    res = randn(shape, g, dtype).requires_grad_()
    weight = (randn(shape[-1], g) * 0.5 + 1).requires_grad_() if affine != "none" else None
    bias = (randn(shape[-1], g) * 0.1).requires_grad_() if affine == "both" else None
    params = [p for p in (weight, bias) if p is not None]
    grad = randn(shape, g, dtype)  # what the kernel, its reference and the oracle get
    out = add_layer_norm(x, res, weight, bias, 1e-5, use_triton=True)
    assert out.dtype == dtype and out.shape == x.shape
    out.backward(grad)
    leaves = [t.detach().double().requires_grad_() for t in (x, res, *params)]
    xd, rd, *pd = leaves
    wd = pd[0] if weight is not None else None
    bd = pd[1] if bias is not None else None
    exact = F.layer_norm(xd + rd, shape[-1:], wd, bd, 1e-5)
    exact.backward(grad.double())
    plain = [t.detach().clone().requires_grad_() for t in (x, res, *params)]
    xr, rr, *pr = plain
    ref = add_layer_norm_reference(xr, rr, pr[0] if weight is not None else None,
                                   pr[1] if bias is not None else None, 1e-5)
    ref.backward(grad)
    assert_as_close_as_reference((out.detach(), x.grad, res.grad), (exact.detach(), xd.grad, rd.grad),
                                 (ref.detach(), xr.grad, rr.grad), dtype)
    assert_as_close_as_reference([p.grad for p in params], [p.grad for p in pd], [p.grad for p in pr], dtype,
                                 elementwise=False)


def test_add_layer_norm_needs_no_saved_sum_without_grad_and_checks_shapes():
    g = torch.Generator().manual_seed(5)
    x, res = randn((6, 40), g), randn((6, 40), g)
    weight, bias = randn(40, g), randn(40, g)
    with torch.no_grad():
        out, saved, _, _ = torch.ops.sslam_kernels.add_layer_norm(x, res, weight, bias, 1e-5, False)
    assert saved.numel() == 0
    torch.testing.assert_close(out, add_layer_norm_reference(x, res, weight, bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(add_layer_norm(x, res, weight, bias, use_triton=True), out, rtol=0, atol=0)
    with pytest.raises(ValueError, match="same shape"):
        add_layer_norm(x, res[:2], weight, bias)
    with pytest.raises(ValueError, match="weight"):
        add_layer_norm(x, res, weight[:3], bias)
    torch.library.opcheck(torch.ops.sslam_kernels.add_layer_norm.default,
                          (x.requires_grad_(), res, weight.requires_grad_(), bias, 1e-5, True))
