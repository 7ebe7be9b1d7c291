"""The bf16 residual stream (model.layer_norm / LayerNorm keep the input dtype, statistics in fp32)
and the channels-last decoder, against their references on fresh inputs of odd shapes."""
import pytest
import torch
import torch.nn.functional as F

from sslam_fast.implementation import ORIGINAL, set_implementation
from sslam_fast.model import CNNDecoder, LayerNorm, layer_norm

from helpers import tiny_config, tiny_model


@pytest.mark.parametrize("shape", [(3, 7, 48), (2, 1, 33), (5, 103, 96)])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_keeps_bf16_and_is_as_accurate_as_torch_bf16(shape, affine):
    g = torch.Generator().manual_seed(sum(shape))
    D = shape[-1]
    x = (torch.randn(shape, generator=g) * 3 + 1).to(torch.bfloat16).requires_grad_()
    w = (1 + 0.1 * torch.randn(D, generator=g)).requires_grad_() if affine else None
    b = (0.1 * torch.randn(D, generator=g)).requires_grad_() if affine else None
    grad = torch.randn(shape, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer_norm(x, (D,), w, b, 1e-6)
    assert out.dtype == torch.bfloat16
    out.backward(grad.to(out.dtype))
    ours = [out.detach()] + [t.grad for t in (x, w, b) if t is not None]
    exact_in = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b)]
    exact = F.layer_norm(exact_in[0], (D,), exact_in[1], exact_in[2], 1e-6)
    exact.backward(grad.double())
    exact_all = [exact.detach()] + [t.grad for t in exact_in if t is not None]
    plain_in = [t.detach().to(torch.bfloat16).requires_grad_() if t is not None else None for t in (x, w, b)]
    plain = F.layer_norm(*plain_in[:1], (D,), plain_in[1], plain_in[2], 1e-6)
    plain.backward(grad.to(torch.bfloat16))
    plain_all = [plain.detach()] + [t.grad for t in plain_in if t is not None]
    for got, want, torch_bf16 in zip(ours, exact_all, plain_all):
        err = (got.double() - want).abs()
        bound = 2 * (torch_bf16.double() - want).abs() + 1e-2 * want.abs().max() / 2**8
        assert bool((err <= bound).all()), float((err - bound).max())


def test_layer_norm_module_is_nn_layernorm_in_fp32_and_under_original():
    torch.manual_seed(0)
    ln = LayerNorm(40, eps=1e-6)
    ref = torch.nn.LayerNorm(40, eps=1e-6)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    ref.load_state_dict(ln.state_dict())
    x = torch.randn(3, 5, 40)
    assert torch.equal(ln(x), ref(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ln(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("grid,groups", [((5, 3), 4), ((7, 8), 16), ((1, 2), 1)])
def test_channels_last_decoder_matches_the_transposed_layout(grid, groups):
    cfg = tiny_config(embed_dim=48, decoder_groups=groups, decoder_layers=3)
    torch.manual_seed(sum(grid))
    fast = CNNDecoder(cfg)
    with torch.no_grad():
        for conv in fast.convs:
            conv.bias.normal_()
    slow = CNNDecoder(cfg)
    slow.load_state_dict(fast.state_dict())
    slow.ops = ORIGINAL
    x = torch.randn(3, grid[0] * grid[1], 48)
    xs = x.clone().requires_grad_()
    x.requires_grad_()
    grad = torch.randn(3, grid[0] * grid[1], 48)
    out = fast(x, grid)
    out.backward(grad)
    ref = slow(xs, grid)
    ref.backward(grad)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xs.grad, rtol=1e-5, atol=1e-5)
    for a, b in zip(fast.parameters(), slow.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_decoder_parameters_stay_contiguous():
    """DeepSpeed views every parameter as flat bytes: the channels-last decoder keeps them contiguous."""
    model = tiny_model()
    for name in ("original", "fused"):
        set_implementation(model, name)
        assert all(p.is_contiguous() for p in model.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA's autocast policy)")
@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_stream_under_cuda_autocast(stage):
    """Under CUDA autocast nn.LayerNorm returns fp32; the fast path's stream stays bf16."""
    model = tiny_model(stage=stage).cuda()
    seen = {}

    def record(name):
        return lambda module, args, out: seen.setdefault(name, []).append(
            (out[0] if isinstance(out, tuple) else out).dtype)

    hooks = [model.student.norm.register_forward_hook(record("norm"))]
    for block in model.student.blocks:
        hooks += [block.register_forward_hook(record("block")), block.norm1.register_forward_hook(record("norm1"))]
    hooks.append(model.decoder.register_forward_hook(record("decoder")))
    fbank = torch.randn(2, 1, 1024, 128, device="cuda") * 0.5
    for name, want in (("fused", torch.bfloat16), ("original", torch.float32)):
        set_implementation(model, name)
        seen.clear()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(fbank, generator=torch.Generator("cuda").manual_seed(0))
        out["loss"].backward()
        assert {k: set(v) for k, v in seen.items()} == {
            "norm": {want}, "norm1": {want}, "block": {want}, "decoder": {torch.bfloat16}}, name
    for h in hooks:
        h.remove()


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("kernels", [False, True], ids=["reference", "triton"])
def test_fast_block_matches_the_plain_block(autocast, kernels):
    """A fast block (qkv / fc1 backward summing the residual gradient inside the GEMM, the fused
    add + LayerNorm and bias + GELU ops; ``kernels``: their Triton paths, through the interpreter
    on CPU) gives the plain block's output and gradients (the "original" ops run it plainly)."""
    import dataclasses
    import functools

    import sslam_kernels
    from sslam_fast.implementation import FUSED
    from sslam_fast.model import Block

    torch.manual_seed(0)
    fast = Block(48, 4, 4.0, 1e-6, "sdpa")
    plain = Block(48, 4, 4.0, 1e-6, "sdpa")
    plain.load_state_dict(fast.state_dict())
    fast_ops = FUSED if not kernels else dataclasses.replace(
        FUSED, **{n: functools.partial(getattr(sslam_kernels, n), use_triton=True) for n in ("add_layer_norm", "bias_gelu")})
    for block, ops in ((fast, fast_ops), (plain, ORIGINAL)):
        for m in block.modules():
            if hasattr(m, "ops"):
                m.ops = ops
    x = torch.randn(3, 11, 48)
    grads = []
    for block, bf16 in ((fast, autocast), (plain, autocast), (plain, False)):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out, r = block(xi)
        (out.float().square().sum() + r.float().sum()).backward()
        grads.append([out.detach(), xi.grad] + [p.grad for p in block.parameters()])
        block.zero_grad()
    for got, plain_got, exact in zip(*grads):
        if autocast:  # the fast block's error from fp32 within twice the plain bf16 block's (max norm)
            err, plain_err = (got.float() - exact).abs().max(), (plain_got.float() - exact).abs().max()
            assert err <= 2 * plain_err + 1e-3 * exact.abs().max(), (float(err), float(plain_err))
        else:
            torch.testing.assert_close(got, plain_got, rtol=1e-4, atol=1e-5)
