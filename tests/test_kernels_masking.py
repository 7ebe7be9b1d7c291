"""Inverse block masks: the Triton kernel (interpreter on CPU) against the reference's rules,
exact counts and statistics over many draws."""
import math

import pytest
import torch

import sslam_kernels.masking as masking_module
from sslam_kernels.masking import (inverse_block_mask, inverse_block_mask_reference,
                                   inverse_block_mask_triton, keep_index_from_mask, mask_counts)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Kernel outputs start as garbage (all masked, index -7): unwritten elements show up."""
    def empty(*shape, dtype=None, device=None):
        out = torch.empty(*shape, dtype=dtype, device=device)
        return out.fill_(True) if dtype == torch.bool else out.fill_(-7)
    monkeypatch.setattr(masking_module, "_empty", empty)


def _draw_triton(num_views, grid, seed, **kw):
    gen = torch.Generator().manual_seed(seed)
    return inverse_block_mask_triton(num_views, grid, generator=gen, device=DEVICE, **kw)


@pytest.mark.parametrize("grid,params,views_per_program", [
    ((64, 8), {}, None),
    ((13, 5), {}, 4),            # P = 65: not a power of two; views do not fill the last program
    ((7, 3), {"mask_length": 4, "mask_prob": 0.6}, 3),
    ((5, 5), {"mask_prob": 1.0}, None),   # nothing kept
    ((6, 4), {"mask_prob": 0.0}, None),   # everything kept
])
def test_exact_counts_and_index(grid, params, views_per_program):
    num_views = 37
    P = grid[0] * grid[1]
    _, num_keep = mask_counts(P, **params)
    mask, keep = _draw_triton(num_views, grid, 11, views_per_program=views_per_program, **params)
    assert mask.shape == (num_views, P) and keep.shape == (num_views, num_keep)
    assert ((~mask).sum(1) == num_keep).all()
    torch.testing.assert_close(keep, keep_index_from_mask(mask, num_keep), rtol=0, atol=0)
    ref = inverse_block_mask_reference(num_views, grid, **params)
    assert ((~ref).sum(1) == num_keep).all()


def test_seeded_draws_repeat_and_differ():
    a, _ = _draw_triton(9, (64, 8), 5)
    b, _ = _draw_triton(9, (64, 8), 5)
    c, _ = _draw_triton(9, (64, 8), 6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(row.tolist()) for row in a}) == 9  # views are independent draws


def _contains_full_block(kept, grid, length):
    """Whether some centre's clamped ``length`` square lies entirely in ``kept`` [rows, cols]."""
    rows, cols = grid
    lo, hi = length // 2, length - 1 - length // 2
    for r in range(rows):
        for c in range(cols):
            if kept[max(r - lo, 0):min(r + hi, rows - 1) + 1, max(c - lo, 0):min(c + hi, cols - 1) + 1].all():
                return True
    return False


@pytest.mark.parametrize("length,mask_prob,adjust", [(3, 0.8, -0.08), (4, 0.7, -0.05)])
def test_block_structure_when_blocks_are_never_trimmed(length, mask_prob, adjust):
    # One centre and more kept patches than a block: the whole (clamped) block must survive.
    grid = (10, 8)
    params = {"mask_prob": mask_prob, "mask_length": length, "mask_prob_adjust": adjust}
    num_centres, num_keep = mask_counts(80, **params)
    assert num_centres == 1 and num_keep >= length**2
    mask, _ = _draw_triton(64, grid, 3, **params)
    for row in mask:
        assert _contains_full_block(~row.view(grid).cpu(), grid, length)


def _adjacent_kept_pairs(mask, grid):
    kept = (~mask).view(-1, *grid).float()
    return (kept[:, 1:] * kept[:, :-1]).sum((1, 2)) + (kept[:, :, 1:] * kept[:, :, :-1]).sum((1, 2))


def test_statistics_match_reference_spec_config():
    # docs/method.md §4: 64 x 8 grid, 5 centres, 102 kept. Per-position coverage and block
    # clustering of the kernel's draws against the reference's, within 5 standard errors.
    grid, n = (64, 8), 2048
    mask, _ = _draw_triton(n, grid, 1234)
    ref = inverse_block_mask_reference(n, grid, generator=torch.Generator().manual_seed(4321))
    mask, ref = mask.cpu().double(), ref.double()
    p_k, p_r = mask.mean(0), ref.mean(0)
    se = torch.sqrt((p_k * (1 - p_k) + p_r * (1 - p_r)) / n).clamp_min(1e-3)
    assert ((p_k - p_r).abs() / se).max() < 5
    assert p_r.max() - p_r.min() > 0.1  # the edges are masked more often: a real check
    adj_k, adj_r = _adjacent_kept_pairs(mask.bool(), grid), _adjacent_kept_pairs(ref.bool(), grid)
    se_adj = math.sqrt((adj_k.var() + adj_r.var()).item() / n)
    assert abs(adj_k.mean() - adj_r.mean()).item() < 5 * se_adj
    # far above what scattering 102 patches at random would give (about 102 * 2 * 0.2 = 41)
    assert adj_k.mean() > 120


def test_dispatcher_uses_reference_on_cpu():
    gen_a, gen_b = torch.Generator().manual_seed(8), torch.Generator().manual_seed(8)
    mask, keep = inverse_block_mask(6, (64, 8), generator=gen_a, return_keep_index=True)
    ref = inverse_block_mask_reference(6, (64, 8), generator=gen_b)
    if DEVICE == "cpu":
        assert torch.equal(mask, ref)
    torch.testing.assert_close(keep, keep_index_from_mask(mask, 102), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_dispatch_and_cuda_generator():
    gen = torch.Generator(device="cuda").manual_seed(0)
    mask, keep = inverse_block_mask(192, (64, 8), generator=gen, device="cuda", return_keep_index=True)
    assert mask.is_cuda and ((~mask).sum(1) == 102).all()
    torch.testing.assert_close(keep, keep_index_from_mask(mask, 102), rtol=0, atol=0)


def test_kernel_launch_is_a_library_op_that_compiles():
    """The launch is ``torch.ops.sslam_kernels.inverse_block_mask`` (a fake implementation for
    tracing): a function drawing masks from a seed tensor compiles with fullgraph=True and gives
    the eager masks."""
    seed = torch.tensor([12345], dtype=torch.int64, device=DEVICE)
    args = (seed, 11, 13, 5, 3, 13, 5, 4)
    torch.library.opcheck(torch.ops.sslam_kernels.inverse_block_mask.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    mask, keep = torch.ops.sslam_kernels.inverse_block_mask(*args)
    assert mask.shape == (11, 65) and ((~mask).sum(1) == 13).all()

    def draw(s):
        m, k = torch.ops.sslam_kernels.inverse_block_mask(s, 11, 13, 5, 3, 13, 5, 4)
        return m, k + 0

    torch._dynamo.reset()
    got_mask, got_keep = torch.compile(draw, fullgraph=True, backend="aot_eager")(seed)
    assert torch.equal(got_mask, mask) and torch.equal(got_keep, keep)
