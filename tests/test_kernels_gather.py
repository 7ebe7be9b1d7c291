"""embed_mask_gather / decoder_input_scatter: Triton (interpreter on CPU) against plain indexing,
forward and backward, with poisoned outputs, on odd shapes."""
import zlib

import pytest
import torch

import sslam_kernels.gather as gather_module
from sslam_kernels import decoder_input_gather, decoder_input_scatter, embed_mask_gather
from sslam_kernels.gather import (decoder_input_gather_reference, decoder_input_scatter_reference,
                                  embed_mask_gather_reference)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Kernel outputs (forward and backward) start as NaN / -7: unwritten elements show up."""
    def empty(*shape, dtype=None, device=None):
        out = torch.empty(*shape, dtype=dtype, device=device)
        return out.fill_(float("nan")) if out.dtype.is_floating_point else out.fill_(-7)
    monkeypatch.setattr(gather_module, "_empty", empty)


def _keep_index(views, P, K, gen, ascending=True):
    idx = torch.stack([torch.randperm(P, generator=gen)[:K] for _ in range(views)])
    return (idx.sort(1).values if ascending else idx).to(DEVICE)


# (N, P, D, clone, K): single elements, D past the 256-wide tile and not a multiple of it,
# K == P, many clones sharing patches
SHAPES = [(1, 1, 1, 1, 1), (3, 13, 37, 4, 5), (2, 65, 300, 3, 17), (2, 20, 8, 1, 20), (1, 9, 16, 7, 8)]
PREFIXES = ["cls", "flat", "multi", None]


def _inputs(shape, prefix_kind, gen, dtype=torch.float32, pos_grad=False, layout="contiguous"):
    N, P, D, clone, K = shape
    if layout == "conv":  # [N, D, P] transposed, as Conv2d(...).flatten(2).transpose(1, 2) gives
        patches = torch.randn(N, D, P, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    else:
        patches = torch.randn(N, P, D, generator=gen).to(DEVICE, dtype)
    patches.requires_grad_(True)
    pos = torch.randn(P, D, generator=gen).to(DEVICE).requires_grad_(pos_grad)
    prefix = {"cls": (1, 1, D), "flat": (D,), "multi": (3, D), None: None}[prefix_kind]
    cls = None if prefix is None else torch.randn(prefix, generator=gen).to(DEVICE).requires_grad_(True)
    return patches, pos, cls, _keep_index(N * clone, P, K, gen), clone


def _grads(out, inputs, grad):
    wanted = [x for x in inputs if x is not None and x.requires_grad]
    return torch.autograd.grad(out, wanted, grad)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("prefix_kind", PREFIXES)
def test_embed_mask_gather_matches_reference(shape, prefix_kind):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{shape}-{prefix_kind}".encode()))
    patches, pos, cls, keep, clone = _inputs(shape, prefix_kind, gen, pos_grad=prefix_kind == "multi")
    out = embed_mask_gather(patches, pos, cls, keep, clone, use_triton=True)
    ref = embed_mask_gather_reference(patches, pos, cls, keep, clone)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    grad = torch.randn(out.shape, generator=gen).to(DEVICE)
    for g, r in zip(_grads(out, (patches, pos, cls), grad), _grads(ref, (patches, pos, cls), grad)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_embed_without_index_or_pos_and_strided_patches():
    gen = torch.Generator().manual_seed(7)
    patches, pos, cls, keep, clone = _inputs((2, 24, 40, 2, 6), "cls", gen, layout="conv")
    for args in [(patches, None, cls, keep, clone), (patches, pos, cls, None, clone), (patches, pos, None, None, 1)]:
        out = embed_mask_gather(*args, use_triton=True)
        ref = embed_mask_gather_reference(*args)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        grad = torch.randn(out.shape, generator=gen).to(DEVICE)
        for g, r in zip(_grads(out, args[:3], grad), _grads(ref, args[:3], grad)):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_embed_rejects_mismatched_shapes():
    patches = torch.zeros(2, 5, 4, device=DEVICE)
    with pytest.raises(ValueError):
        embed_mask_gather(patches, torch.zeros(6, 4, device=DEVICE), None, None)
    with pytest.raises(ValueError):
        embed_mask_gather(patches, None, None, torch.zeros(3, 2, dtype=torch.long, device=DEVICE), clone=2)


@pytest.mark.parametrize("V,P,D,K", [(1, 1, 1, 1), (5, 13, 37, 4), (3, 65, 300, 65), (4, 30, 9, 11)])
@pytest.mark.parametrize("ascending", [True, False])
def test_decoder_input_scatter_matches_reference(V, P, D, K, ascending):
    gen = torch.Generator().manual_seed(V * 1000 + P + K + ascending)
    visible = torch.randn(V, K, D, generator=gen).to(DEVICE).requires_grad_(True)
    noise = torch.randn(V, P, D, generator=gen).to(DEVICE) * 0.01
    keep = _keep_index(V, P, K, gen, ascending)
    out = decoder_input_scatter(visible, keep, noise, use_triton=True)
    ref = decoder_input_scatter_reference(visible, keep, noise)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    grad = torch.randn(out.shape, generator=gen).to(DEVICE)
    g, r = torch.autograd.grad(out, visible, grad)[0], torch.autograd.grad(ref, visible, grad)[0]
    torch.testing.assert_close(g, r, rtol=0, atol=0)


def _bf16_close(out, ref_fp32, torch_bf16, eps=1e-6):
    """STYLE.md: |out - ref_fp32| <= 2 |torch_same_dtype - ref_fp32| + eps, elementwise."""
    err = (out.float() - ref_fp32.float()).abs()
    bound = 2 * (torch_bf16.float() - ref_fp32.float()).abs() + eps
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", [(12, 512, 768, 16, 102), (3, 65, 300, 4, 17)])
def test_embed_mask_gather_bf16_gpu(shape):
    gen = torch.Generator().manual_seed(0)
    patches, pos, cls, keep, clone = _inputs(shape, "cls", gen, dtype=torch.bfloat16, layout="conv")
    pos = pos.bfloat16()
    out = embed_mask_gather(patches, pos, cls, keep, clone)
    as32 = [x.detach().float().requires_grad_(True) for x in (patches, pos, cls)]
    ref32 = embed_mask_gather_reference(as32[0], as32[1], as32[2], keep, clone)
    ref16 = embed_mask_gather_reference(patches, pos, cls.bfloat16(), keep, clone)
    _bf16_close(out, ref32, ref16)
    grad = torch.randn(out.shape, generator=gen).to(DEVICE, torch.bfloat16)
    g_out = torch.autograd.grad(out, patches, grad)[0]
    g_32 = torch.autograd.grad(ref32, as32[0], grad.float())[0]
    g_16 = torch.autograd.grad(ref16, patches, grad)[0]
    _bf16_close(g_out, g_32, g_16)


@pytest.mark.gpu
@gpu
def test_decoder_input_scatter_bf16_gpu():
    gen = torch.Generator().manual_seed(1)
    V, P, D, K = 192, 512, 768, 102
    visible = torch.randn(V, K, D, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_(True)
    noise = (torch.randn(V, P, D, generator=gen) * 0.01).to(DEVICE, torch.bfloat16)
    keep = _keep_index(V, P, K, gen)
    out = decoder_input_scatter(visible, keep, noise)
    torch.testing.assert_close(out, decoder_input_scatter_reference(visible, keep, noise), rtol=0, atol=0)
    grad = torch.randn(out.shape, generator=gen).to(DEVICE, torch.bfloat16)
    torch.testing.assert_close(torch.autograd.grad(out, visible, grad)[0],
                               grad[torch.arange(V, device=DEVICE)[:, None], keep], rtol=0, atol=0)


@pytest.mark.parametrize("V,P,D,K,num_extra", [(1, 1, 1, 1, 0), (4, 13, 37, 5, 1), (3, 65, 300, 17, 2)])
def test_decoder_input_gather_matches_eat_layout(V, P, D, K, num_extra):
    gen = torch.Generator().manual_seed(V + P + K)
    x = torch.randn(V, num_extra + K, D, generator=gen).to(DEVICE).requires_grad_(True)
    tokens = torch.randn(V, P - K, D, generator=gen).to(DEVICE).requires_grad_(True)
    shuffle = torch.stack([torch.randperm(P, generator=gen) for _ in range(V)]).to(DEVICE)
    restore = shuffle.argsort(1)
    out = decoder_input_gather(x, restore[..., None].expand(-1, -1, D), tokens, num_extra, use_triton=True)
    ref = decoder_input_gather_reference(x, restore, tokens, num_extra)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    grad = torch.randn(out.shape, generator=gen).to(DEVICE)
    for g, r in zip(torch.autograd.grad(out, (x, tokens), grad), torch.autograd.grad(ref, (x, tokens), grad)):
        torch.testing.assert_close(g, r, rtol=0, atol=0)
