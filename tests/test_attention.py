import pytest
import torch

from sslam_fast.attention import attention, eager_attention

SHAPES = [(1, 1, 1, 8), (3, 4, 103, 16), (2, 3, 273, 32), (5, 2, 17, 64)]


def reference(q, k, v):
    """Attention written out in float64."""
    s = (q.double() @ k.double().transpose(-2, -1)) / q.shape[-1] ** 0.5
    return s.softmax(-1) @ v.double()


def inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["sdpa", "eager", "auto"])
def test_fp32_forward_and_backward(shape, mode):
    q, k, v = inputs(shape, torch.float32, seed=sum(shape))
    out = attention(q, k, v, mode)
    out.retain_grad()
    grad = torch.randn_like(out)
    out.backward(grad)
    got = [t.grad.clone() for t in (q, k, v)]
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference(qd, kd, vd)
    ref.backward(grad.double())
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=1e-5)
    for g_ours, t in zip(got, (qd, kd, vd)):
        assert torch.allclose(g_ours.double(), t.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", SHAPES[1:])
def test_bf16_sdpa_within_twice_eager_bf16_error(shape):
    q, k, v = inputs(shape, torch.float32, seed=7)
    ref = eager_attention(q, k, v).detach()
    qb, kb, vb = (t.detach().bfloat16() for t in (q, k, v))
    fast = attention(qb, kb, vb, "sdpa").float()
    plain = eager_attention(qb, kb, vb).float()
    assert (fast - ref).abs().max() <= 2 * (plain - ref).abs().max() + 1e-3


def test_flash_mode_without_flash_attn_is_a_clear_error():
    from sslam_fast import attention as module

    if module.FLASH_AVAILABLE:
        pytest.skip("flash-attn is installed")
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="flash_attn"):
        attention(q, q, q, "flash")
