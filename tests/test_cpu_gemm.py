"""fp32 Linear layers through oneDNN on x86 CPUs (sslam_fast/cpu_gemm.py): forward and backward
against float64 F.linear on odd shapes, the residual gradient added inside the GEMM, GELU fused,
where it applies (fp32 CPU, no autocast) and that the fused implementation runs it and the
reference / original implementations do not."""
import pytest
import torch
import torch.nn.functional as F

from sslam_fast import cpu_gemm
from sslam_fast.implementation import set_implementation
from sslam_fast.model import residual_linear

from helpers import fbank_batch, tiny_model

needs_onednn = pytest.mark.skipif(not cpu_gemm.available(), reason="needs an x86 torch with oneDNN")
SHAPES = [(1, 7, 48, 83), (3, 37, 48, 83), (2, 129, 96, 33)]


def _data(shape, seed):
    *lead, k, n = shape
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*lead, k, generator=g), torch.randn(n, k, generator=g) / k ** 0.5, torch.randn(n, generator=g),
            torch.randn(*lead, n, generator=g))


def _close(got, want, scale):
    """fp32 products summed in another order than float64's: 1e-5 of the values' scale."""
    assert got.shape == want.shape
    assert float((got.detach().double() - want.detach()).abs().max()) <= 1e-5 * float(scale)


@needs_onednn
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_forward_and_backward_match_float64(shape, bias):
    x, w, b, gy = _data(shape, sum(shape))
    b = b if bias else None
    leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    y = cpu_gemm.linear(leaves[0], leaves[1], leaves[2] if bias else None)
    y.backward(gy)
    ref = [t.double().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    y_ref = F.linear(ref[0], ref[1], ref[2] if bias else None)
    y_ref.backward(gy.double())
    _close(y, y_ref, y_ref.detach().abs().max())
    for got, want in zip(leaves, ref):
        _close(got.grad, want.grad, want.grad.abs().max())
    assert type(y.grad_fn).__name__ == "_LinearBackward", "oneDNN's backward must run"


@needs_onednn
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_ops_match_float64(shape):
    x, w, b, residual = _data(shape, 7 + sum(shape))
    x2d = x.reshape(-1, x.shape[-1])
    want = F.linear(x.double(), w.double(), b.double())
    _close(cpu_gemm.matmul(x, w, b, gelu=True), F.gelu(want), want.abs().max())
    _close(cpu_gemm.matmul(x, w, b, add=residual), want + residual.double(), want.abs().max())
    gy = torch.randn(x2d.shape[0], w.shape[0], generator=torch.Generator().manual_seed(1))
    _close(cpu_gemm.grad_input(gy, w), gy.double() @ w.double(), (gy.double() @ w.double()).abs().max())
    with_residual = gy.double() @ w.double() + x2d.double()
    _close(cpu_gemm.grad_input(gy, w, x2d.contiguous()), with_residual, with_residual.abs().max())
    _close(cpu_gemm.grad_weight(gy, x2d), gy.double().t() @ x2d.double(), (gy.double().t() @ x2d.double()).abs().max())


@needs_onednn
def test_residual_linear_gradients_through_onednn_match_the_unfused_ones():
    x, w, b, gy = _data((2, 37, 48, 83), 3)
    g_res = torch.randn_like(x)
    grads = {}
    for fused, onednn in ((False, False), (True, True), (False, True)):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        y, passed = residual_linear(leaves[0], leaves[1], leaves[2], fused, onednn)
        torch.autograd.backward([y, passed], [gy, g_res])
        grads[fused, onednn] = [t.grad for t in leaves]
    for key in ((True, True), (False, True)):
        for got, want in zip(grads[key], grads[False, False]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_where_it_applies():
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    assert cpu_gemm.applies(x, w) == cpu_gemm.available()
    assert not cpu_gemm.applies(x.double(), w.double()) and not cpu_gemm.applies(x.bfloat16(), w.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not cpu_gemm.applies(x, w)
        assert cpu_gemm.linear(x, w).dtype == torch.bfloat16  # F.linear under autocast, as before


@needs_onednn
def test_the_fused_implementation_runs_it_and_the_baselines_do_not(monkeypatch):
    calls = []
    matmul = cpu_gemm.matmul
    monkeypatch.setattr(cpu_gemm, "matmul", lambda *a, **k: calls.append(1) or matmul(*a, **k))
    fbank = fbank_batch(2, 64)
    counts = {}
    for name in ("fused", "reference", "original"):
        model = set_implementation(tiny_model(), name)
        calls.clear()
        out = model(fbank, generator=torch.Generator().manual_seed(0), host_generator=torch.Generator().manual_seed(1),
                    stats=False)
        out["loss"].backward()
        counts[name] = len(calls)
    assert counts["fused"] > 0 and counts["reference"] == 0 and counts["original"] == 0, counts


@needs_onednn
def test_mlp_without_grad_fuses_gelu_and_matches_the_reference(monkeypatch):
    from sslam_fast.model import Mlp

    fused = []
    matmul = cpu_gemm.matmul
    monkeypatch.setattr(cpu_gemm, "matmul", lambda *a, **k: fused.append(k.get("gelu", False)) or matmul(*a, **k))
    mlp = Mlp(48, 83)
    x = torch.randn(3, 37, 48, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = mlp(x)
        want = F.linear(F.gelu(F.linear(x.double(), mlp.fc1.weight.double(), mlp.fc1.bias.double())),
                        mlp.fc2.weight.double(), mlp.fc2.bias.double())
        set_implementation(mlp, "reference")
        reference = mlp(x)
    _close(got, want, want.abs().max())
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-6)
    assert fused == [True, False], "fc1 with GELU in its epilogue, then fc2; the reference calls neither"
    assert cpu_gemm.applies_without_grad(x, mlp.fc1.weight) is False  # parameters want gradients
    with torch.no_grad():
        assert cpu_gemm.applies_without_grad(x, mlp.fc1.weight)
