"""Kernel benchmarks (pytest-benchmark): each op with a ``provider`` switch, the fast path and its
torch reference in the same run. CUDA only: on a CPU the interpreter's timings mean nothing, so
every entry skips.

    pytest benchmarks/bench_kernels.py --benchmark-json=out.json

Each entry times ``INNER`` back-to-back calls and synchronises (host clock, pytest-benchmark's
statistics) and also stores the median device time of one call from ``triton.testing.do_bench``
(CUDA events) in ``extra_info["device_ms"]``, with the bytes the op must move at least.
"""
import functools

import pytest
import torch

import sslam_kernels as sk
from sslam_kernels.ema import EMAPair, EMAPlan, ema_update_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel benchmarks need CUDA")
INNER = 10
VIEWS, CLIPS, GRID, DIM = 192, 12, (64, 8), 768
FIGURES = {}  # (op, provider, student_dtype) -> extra_info of the entry, for test_goals


def _run(benchmark, fn, bytes_moved=None, **info):
    import triton

    def timed():
        for _ in range(INNER):
            fn()
        torch.cuda.synchronize()

    fn()
    torch.cuda.synchronize()
    device_ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    benchmark.extra_info.update(info, device_ms=device_ms, inner=INNER,
                                device=torch.cuda.get_device_name())
    if bytes_moved is not None:
        benchmark.extra_info.update(bytes=bytes_moved, gb_per_s=bytes_moved / device_ms / 1e6)
    FIGURES[(info.get("op"), info.get("provider"), info.get("student_dtype"))] = dict(benchmark.extra_info)
    benchmark.pedantic(timed, rounds=10, warmup_rounds=2)


def vit_b_shapes():
    """Parameter shapes of a ViT-B/16 audio encoder (docs/method.md §3): 149 tensors, 85.3M values."""
    D, H = 768, 3072
    shapes = [(D, 1, 16, 16), (D,), (1, 1, D), (D,), (D,)]  # patch conv, CLS, input LayerNorm
    for _ in range(12):
        shapes += [(3 * D, D), (3 * D,), (D, D), (D,), (D,), (D,), (H, D), (H,), (D, H), (D,), (D,), (D,)]
    return shapes


@pytest.fixture(scope="module")
def copy_buffers():
    n = 256 * 2**20  # 1 GiB of fp32
    return torch.randn(n, device="cuda"), torch.empty(n, device="cuda")


def test_device_copy_bandwidth(benchmark, copy_buffers):
    src, dst = copy_buffers
    _run(benchmark, lambda: dst.copy_(src), bytes_moved=2 * src.numel() * 4, op="copy")


@pytest.mark.parametrize("student_dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("provider", ["triton", "foreach_lerp", "foreach", "loop"])
def test_ema_update(benchmark, provider, student_dtype):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[student_dtype]
    shapes = vit_b_shapes()
    teacher = [torch.randn(s, device="cuda") for s in shapes]
    student = [torch.randn(s, device="cuda").to(dtype) for s in shapes]
    numel = sum(t.numel() for t in teacher)
    decay = 0.9998
    if provider == "triton":
        plan = EMAPlan([EMAPair(t, s) for t, s in zip(teacher, student)])

        def fn():
            plan.launch(decay)
    elif provider == "foreach_lerp":
        if dtype != torch.float32:  # lerp needs matching dtypes: the upcast is part of its cost
            def fn():
                torch._foreach_lerp_(teacher, [s.float() for s in student], 1 - decay)
        else:
            def fn():
                torch._foreach_lerp_(teacher, student, 1 - decay)
    elif provider == "foreach":
        def fn():
            torch._foreach_mul_(teacher, decay)
            torch._foreach_add_(teacher, [s.to(t.dtype) for t, s in zip(teacher, student)], alpha=1 - decay)
    else:
        def fn():
            ema_update_reference(teacher, student, decay)
    _run(benchmark, fn, bytes_moved=numel * (8 + student[0].element_size()), op="ema",
         provider=provider, student_dtype=student_dtype, tensors=len(shapes), params=numel)


def _mask_inputs():
    gen = torch.Generator(device="cuda").manual_seed(0)
    patches = torch.randn(CLIPS, DIM, GRID[0] * GRID[1], device="cuda",
                          dtype=torch.bfloat16).transpose(1, 2)  # Conv2d(...).flatten(2).transpose(1, 2)
    pos = torch.randn(GRID[0] * GRID[1], DIM, device="cuda", dtype=torch.bfloat16)
    cls = torch.randn(1, 1, DIM, device="cuda", dtype=torch.bfloat16)
    return gen, patches, pos, cls


@pytest.mark.parametrize("provider", ["triton", "torch"])
def test_mask_and_gather(benchmark, provider):
    """Masks for 192 views + pos add + visible gather + CLS, from 12 clips' patch embeddings."""
    gen, patches, pos, cls = _mask_inputs()
    clone = VIEWS // CLIPS
    if provider == "triton":
        def fn():
            _, keep = sk.inverse_block_mask(VIEWS, GRID, generator=gen, device="cuda", return_keep_index=True)
            return sk.embed_mask_gather(patches, pos, cls, keep, clone)
    else:
        def fn():
            mask = sk.inverse_block_mask_reference(VIEWS, GRID, generator=gen, device="cuda")
            keep = sk.keep_index_from_mask(mask, 102)
            x = (patches + pos).repeat_interleave(clone, 0)
            x = x[torch.arange(VIEWS, device="cuda")[:, None], keep]
            return torch.cat([cls.expand(VIEWS, -1, -1), x], dim=1)
    out_bytes = VIEWS * 103 * DIM * 2
    _run(benchmark, fn, bytes_moved=out_bytes + patches.numel() * 2, op="mask+gather", provider=provider)


@pytest.mark.parametrize("provider", ["triton", "torch"])
def test_gather_forward_backward(benchmark, provider):
    """embed_mask_gather forward + backward with given masks (the autograd part of the above)."""
    gen, patches, pos, cls = _mask_inputs()
    patches = patches.detach().requires_grad_(True)
    cls = cls.detach().float().requires_grad_(True)
    _, keep = sk.inverse_block_mask(VIEWS, GRID, generator=gen, device="cuda", return_keep_index=True)
    grad = torch.randn(VIEWS, 103, DIM, device="cuda", dtype=torch.bfloat16)
    use_triton = provider == "triton"

    def fn():
        out = sk.embed_mask_gather(patches, pos, cls, keep, VIEWS // CLIPS, use_triton=use_triton)
        torch.autograd.grad(out, (patches, cls), grad)
    _run(benchmark, fn, op="gather fwd+bwd", provider=provider)


@pytest.mark.parametrize("provider", ["triton", "torch"])
def test_decoder_input_scatter(benchmark, provider):
    gen, _, _, _ = _mask_inputs()
    _, keep = sk.inverse_block_mask(VIEWS, GRID, generator=gen, device="cuda", return_keep_index=True)
    visible = torch.randn(VIEWS, 102, DIM, device="cuda", dtype=torch.bfloat16)
    noise = torch.randn(VIEWS, GRID[0] * GRID[1], DIM, device="cuda", dtype=torch.bfloat16)
    use_triton = provider == "triton"
    _run(benchmark, lambda: sk.decoder_input_scatter(visible, keep, noise, use_triton=use_triton),
         bytes_moved=(visible.numel() + 2 * noise.numel()) * 2, op="decoder scatter", provider=provider)


@pytest.mark.parametrize("provider", ["triton", "torch"])
def test_layer_averaged_target(benchmark, provider):
    """12 teacher layers of 24 inputs x 512 patches (CLS sliced off), bf16 -> fp32 target."""
    layers = [torch.randn(24, 513, DIM, device="cuda", dtype=torch.bfloat16)[:, 1:] for _ in range(12)]
    use_triton = provider == "triton"
    _run(benchmark, lambda: sk.layer_averaged_target(layers, use_triton=use_triton),
         bytes_moved=12 * 24 * 512 * DIM * 2 + 3 * 24 * 512 * DIM * 4, op="layer target", provider=provider)


def _epilogue_case(op, use_triton):
    """(function running forward + backward, the bytes both must move at least) at a stage-1 step's
    student / decoder size, bf16: 192 views x 103 tokens for the encoder, x 512 patches for the decoder."""
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device="cuda", generator=gen).to(dtype).requires_grad_()

    rows = VIEWS * 103
    if op == "add+layernorm":
        x, res, w, b = rand(rows, DIM), rand(rows, DIM), rand(DIM), rand(DIM)
        inputs = (x, res, w, b)
        fn = functools.partial(sk.add_layer_norm, x, res, w, b, use_triton=use_triton)
        minimum = rows * DIM * 2 * (4 + 3)  # forward: x, res in; out, sum out; backward: grad, sum in, grad out
    elif op == "bias+gelu":
        h, b = rand(rows, 4 * DIM), rand(4 * DIM)
        inputs = (h, b)
        fn = functools.partial(sk.bias_gelu, h, b, use_triton=use_triton)
        minimum = rows * 4 * DIM * 2 * (2 + 3)
    else:
        y, h = rand(VIEWS, *GRID, DIM), rand(VIEWS, *GRID, DIM)
        inputs = (y, h)
        fn = functools.partial(sk.norm_gelu_residual, y, h, 1e-5, use_triton=use_triton)
        minimum = VIEWS * GRID[0] * GRID[1] * DIM * 2 * (3 + 3)
    out = fn()
    grad = torch.randn(out.shape, device="cuda", generator=gen).to(out.dtype)

    def step():
        torch.autograd.grad(fn(), inputs, grad)
    return step, minimum


@pytest.mark.parametrize("op", ["add+layernorm", "bias+gelu", "norm+gelu+residual"])
@pytest.mark.parametrize("provider", ["triton", "torch"])
def test_epilogue_forward_backward(benchmark, op, provider):
    """The step's fused epilogues, forward + backward, against their torch references (bf16)."""
    step, minimum = _epilogue_case(op, provider == "triton")
    _run(benchmark, step, bytes_moved=minimum, op=op, provider=provider)


def test_goals():
    """The issue's goals on an H100, from the entries of this run. With an fp32 student
    ``_foreach_lerp_`` already runs near the copy floor, so there the kernel must only not lose."""
    fig = FIGURES
    needed = [("copy", None, None), ("ema", "triton", "fp32"), ("mask+gather", "triton", None)]
    if any(k not in fig for k in needed):
        pytest.skip("run the copy, EMA and masking entries in the same session")

    def ms(*key):
        return fig[key]["device_ms"]

    for dt in ("fp32", "bf16"):
        assert fig[("ema", "triton", dt)]["gb_per_s"] >= 0.8 * fig[("copy", None, None)]["gb_per_s"], dt
        assert ms("ema", "loop", dt) / ms("ema", "triton", dt) >= 5, dt
        lerp_goal = 1.5 if dt == "bf16" else 1.0
        assert ms("ema", "foreach_lerp", dt) / ms("ema", "triton", dt) >= lerp_goal, dt
    assert ms("mask+gather", "torch", None) / ms("mask+gather", "triton", None) >= 3
    for op in ("add+layernorm", "bias+gelu", "norm+gelu+residual"):  # a fused op must not lose to torch
        if (op, "triton", None) in fig and (op, "torch", None) in fig:
            assert ms(op, "torch", None) / ms(op, "triton", None) >= 1.0, op
