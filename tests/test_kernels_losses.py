"""sslam_kernels.masked_regression (Triton, through the interpreter on CPU) against its reference and
against a float64 oracle, forward and backward, odd shapes, fp32 / bf16. On a CUDA machine every
tensor is on the GPU (real Triton, real bf16)."""
import pytest
import torch

import sslam_kernels
from sslam_kernels import masked_regression, masked_regression_reference

SHAPES = [(2, 1, 7, 5), (6, 3, 37, 48), (4, 2, 33, 130)]  # V, clone, P, D
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}


def inputs(V, clone, P, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    pred = (torch.randn(V, P, D, generator=g) + 0.5).to(DEVICE, dtype).requires_grad_()
    target = torch.randn(V // clone, P, D, generator=g).to(DEVICE)
    weights = (torch.rand(V, P, generator=g) < 0.7).float().to(DEVICE)
    shift = pred.detach()[0, 0].float()
    return pred, target, weights, shift


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference_forward_and_backward(shape, dtype):
    V, clone, P, D = shape
    pred, target, weights, shift = inputs(V, clone, P, D, dtype, seed=sum(shape))
    ref_pred = pred.detach().clone().requires_grad_()
    got = masked_regression(pred, target, weights, clone, shift, use_triton=True)
    want = masked_regression_reference(ref_pred, target, weights, clone, shift)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    (got[0] * 0.3).backward()
    (want[0] * 0.3).backward()
    assert pred.grad.dtype == dtype
    torch.testing.assert_close(pred.grad.float(), ref_pred.grad.float(), **TOL[dtype])


@pytest.mark.parametrize("use_triton", [False, True])
def test_against_float64_oracle(use_triton):
    V, clone, P, D = 6, 3, 21, 40
    pred, target, weights, shift = inputs(V, clone, P, D, torch.float32, seed=5)
    loss, s1, s2 = masked_regression(pred, target, weights, clone, shift, use_triton=use_triton)
    p, t, w = pred.detach().double(), target.double(), weights.double()
    rows = p.view(V // clone, clone, P, D) - t[:, None]
    assert torch.allclose(loss.double(), ((rows ** 2).sum(-1) * w.view(V // clone, clone, P)).sum(), rtol=1e-6)
    x = p - shift.double()
    assert torch.allclose(s1.double(), (x * w[..., None]).sum((0, 1)), rtol=1e-5, atol=1e-4)
    assert torch.allclose(s2.double(), (x * x * w[..., None]).sum((0, 1)), rtol=1e-5, atol=1e-4)


def test_shapes_are_checked_and_the_op_passes_opcheck():
    pred, target, weights, shift = inputs(4, 2, 9, 8, torch.float32, seed=1)
    with pytest.raises(ValueError, match="do not match"):
        masked_regression(pred, target[:1], weights, 2)
    torch.library.opcheck(torch.ops.sslam_kernels.masked_regression.default,
                          (pred, target, weights, shift, 2))
    assert "masked_regression" in sslam_kernels.__all__
