"""sslam_kernels.norm_gelu_residual (Triton through the interpreter on CPU) against a float64
oracle and its reference, forward and backward, odd shapes, per-dtype tolerances."""
import pytest
import torch
import torch.nn.functional as F

from sslam_kernels import bias_gelu, bias_gelu_reference, norm_gelu_residual, norm_gelu_residual_reference

SHAPES = [(3, 5, 48), (2, 3, 4, 33), (7, 130), (1, 1, 8)]


def inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    y = (torch.randn(shape, generator=g) * 2 + 0.3).to(dtype).requires_grad_()
    h = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    return y, h, torch.randn(shape, generator=g)


def oracle(y, h, grad, eps):
    yd, hd = (t.detach().double().requires_grad_() for t in (y, h))
    out = hd + F.gelu(F.layer_norm(yd, yd.shape[-1:], eps=eps))
    out.backward(grad.double())
    return out.detach(), yd.grad, hd.grad


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
    for got, want, plain in zip((out.detach(), y.grad, h.grad), exact, (ref.detach(), yr.grad, hr.grad)):
        err = (got.double() - want).abs()
        bound = 2 * (plain.double() - want).abs() + (1e-5 if dtype == torch.float32 else 1e-2) * (1 + want.abs())
        assert bool((err <= bound).all()), float((err - bound).max())


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
    h = (torch.randn(shape, generator=g) * 2).to(dtype).requires_grad_()
    bias = (torch.randn(shape[-1], generator=g) * 0.5).requires_grad_()
    grad = torch.randn(shape, generator=g)
    out = bias_gelu(h, bias, use_triton=True)
    assert out.dtype == dtype
    out.backward(grad.to(dtype))
    hd, bd = h.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    exact = F.gelu(hd + bd)
    exact.backward(grad.double())
    hr, br = h.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    ref = bias_gelu_reference(hr, br)
    ref.backward(grad.to(dtype))
    for got, want, plain in zip((out.detach(), h.grad, bias.grad), (exact.detach(), hd.grad, bd.grad),
                                (ref.detach(), hr.grad, br.grad)):
        err = (got.double() - want).abs()
        bound = 2 * (plain.double() - want).abs() + (1e-5 if dtype == torch.float32 else 1e-2) * (1 + want.abs())
        assert bool((err <= bound).all()), float((err - bound).max())
    torch.library.opcheck(torch.ops.sslam_kernels.bias_gelu.default, (h.detach().float().requires_grad_(), bias))
