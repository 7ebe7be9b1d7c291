"""The pretraining step on a GPU: Triton kernels + SDPA against the plain PyTorch reference path."""
import pytest
import torch

from sslam_fast import Draws, SSLAMConfig, SSLAMPretrainer
from sslam_fast.implementation import set_implementation

pytestmark = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def pair(stage, **overrides):
    torch.manual_seed(0)
    values = dict(stage=stage, embed_dim=192, depth=4, num_heads=3, average_top_k_layers=4, clone_batch=4)
    values.update(overrides)
    fast = SSLAMPretrainer(SSLAMConfig(**values)).cuda()
    ref = set_implementation(SSLAMPretrainer(SSLAMConfig(**{**values, "attention": "eager"})), "reference").cuda()
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def run(model, fbank, draws, bf16):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        out = model(fbank, draws=draws)
    out["loss"].backward()
    grads = torch.cat([p.grad.flatten().float() for p in model.student.parameters()])
    return out, grads


@requires_cuda
@pytest.mark.parametrize("stage", [1, 2])
def test_fp32_step_matches_reference(stage):
    fast, ref = pair(stage)
    fbank = torch.randn(3, 1, 1024, 128, device="cuda") * 0.5
    draws = fast.draw(3, 1024, "cuda", torch.Generator("cuda").manual_seed(1))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    a, ga = run(fast, fbank, draws, bf16=False)
    b, gb = run(ref, fbank, Draws(draws.masks, draws.mix_windows, draws.decoder_noise), bf16=False)
    for k in ("loss", "patch_loss", "cls_loss", "srl_loss"):
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5), k
    assert torch.allclose(ga, gb, rtol=1e-3, atol=1e-5)


@requires_cuda
def test_bf16_step_error_within_twice_the_reference_bf16_error():
    fast, ref = pair(2)
    fbank = torch.randn(3, 1, 1024, 128, device="cuda") * 0.5
    draws = fast.draw(3, 1024, "cuda", torch.Generator("cuda").manual_seed(2))
    exact, _ = run(ref, fbank, draws, bf16=False)
    ref.zero_grad()
    plain, _ = run(ref, fbank, draws, bf16=True)
    ours, _ = run(fast, fbank, draws, bf16=True)
    for k in ("loss", "patch_loss", "cls_loss", "srl_loss"):
        err = (ours[k].float() - exact[k].float()).abs()
        assert err <= 2 * (plain[k].float() - exact[k].float()).abs() + 1e-3 * exact[k].abs(), k


@requires_cuda
def test_teacher_update_on_gpu_matches_formula():
    fast, _ = pair(1)
    before = [p.clone() for p in fast.teacher.parameters()]
    student = [p.detach().clone() for p in fast.student.parameters()]
    decay = fast.update_teacher(10)
    for t0, s, t1 in zip(before, student, fast.teacher.parameters()):
        assert torch.allclose(t1, decay * t0 + (1 - decay) * s, atol=1e-6)
