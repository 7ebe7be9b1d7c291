"""Inverse block masking (docs/method.md §4): the PyTorch reference, also the CPU fallback.

A view keeps a few 2-D blocks of patches (grown around random centres), is then adjusted at
random to an exact number of kept patches, and everything else is masked.
"""
from typing import Optional, Tuple

import torch

from ._triton import tl, triton, triton_available

_empty = torch.empty  # every kernel output is allocated here (tests poison it)


def mask_counts(num_patches: int, mask_prob: float = 0.8, mask_length: int = 5,
                mask_prob_adjust: float = 0.07) -> Tuple[int, int]:
    """(number of block centres, number of kept patches) per view, as the original computes them."""
    keep_prob = 1 - mask_prob
    num_centres = int(num_patches * ((keep_prob + mask_prob_adjust) / mask_length**2))
    num_keep = int(num_patches * keep_prob)
    return num_centres, num_keep


def inverse_block_mask_reference(
    num_views: int,
    grid: Tuple[int, int],
    mask_prob: float = 0.8,
    mask_length: int = 5,
    mask_prob_adjust: float = 0.07,
    generator: Optional[torch.Generator] = None,
    device=None,
) -> torch.Tensor:
    """Draw inverse block masks for ``num_views`` views of a ``grid = (time, freq)`` patch grid.

    Returns a bool tensor [num_views, time * freq] (time-major), True = masked. Every row has
    exactly ``num_patches - mask_counts(...)[1]`` masked patches.

    Centres are drawn uniformly with replacement; each grows into a ``mask_length`` square
    clamped at the grid edges. The kept set is then trimmed (uniformly among kept) or topped up
    (uniformly among the rest) to the exact count, which is what ranking uniform scores with a
    bonus for block membership does, without a per-view loop.
    """
    rows, cols = grid
    num_patches = rows * cols
    num_centres, num_keep = mask_counts(num_patches, mask_prob, mask_length, mask_prob_adjust)
    kept = torch.zeros(num_views, num_patches, dtype=torch.bool, device=device)
    if num_centres > 0:
        centres = torch.randint(0, num_patches, (num_views, num_centres), generator=generator,
                                device=device)
        offsets = torch.arange(mask_length, device=device) - mask_length // 2
        r = (centres // cols)[:, :, None, None] + offsets[None, None, :, None]
        c = (centres % cols)[:, :, None, None] + offsets[None, None, None, :]
        index = r.clamp(0, rows - 1) * cols + c.clamp(0, cols - 1)
        kept.scatter_(1, index.reshape(num_views, -1), True)
    scores = torch.rand(num_views, num_patches, generator=generator, device=device) + kept.float() * 2
    keep_index = scores.topk(num_keep, dim=1, sorted=False).indices
    masked = torch.ones(num_views, num_patches, dtype=torch.bool, device=device)
    masked.scatter_(1, keep_index, False)
    return masked


def keep_index_from_mask(mask: torch.Tensor, num_keep: int) -> torch.Tensor:
    """Ascending visible (False) positions per row of a bool mask [V, P] -> int64 [V, num_keep].

    Every row must have exactly ``num_keep`` False entries. A stable sort, so no host sync."""
    return mask.to(torch.uint8).argsort(dim=1, stable=True)[:, :num_keep]


if triton_available:

    @triton.jit
    def _inverse_block_mask_kernel(seed_ptr, mask_ptr, keep_ptr, num_views,
                                   NUM_CENTRES: tl.constexpr, NUM_KEEP: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, LO: tl.constexpr,
                                   HI: tl.constexpr, IDX_BITS: tl.constexpr,
                                   BLOCK_P: tl.constexpr, VIEWS: tl.constexpr):
        # One program draws VIEWS views. Philox counters: view v uses [v * stride, (v + 1) * stride),
        # centres first, then one score per patch.
        P: tl.constexpr = ROWS * COLS
        view = tl.program_id(0) * VIEWS + tl.arange(0, VIEWS)
        p = tl.arange(0, BLOCK_P)
        valid = (view < num_views)[:, None] & (p < P)[None, :]
        seed = tl.load(seed_ptr)
        stride = NUM_CENTRES + P
        row, col = p // COLS, p % COLS
        kept = tl.zeros((VIEWS, BLOCK_P), dtype=tl.int1)
        for c in range(NUM_CENTRES):
            bits = tl.randint(seed, view * stride + c).to(tl.uint32, bitcast=True).to(tl.int64)
            centre = (bits * P) >> 32  # uniform in [0, P)
            c_row, c_col = centre // COLS, centre % COLS
            r_lo, r_hi = tl.maximum(c_row - LO, 0), tl.minimum(c_row + HI, ROWS - 1)
            k_lo, k_hi = tl.maximum(c_col - LO, 0), tl.minimum(c_col + HI, COLS - 1)
            kept |= ((row[None, :] >= r_lo[:, None]) & (row[None, :] <= r_hi[:, None])
                     & (col[None, :] >= k_lo[:, None]) & (col[None, :] <= k_hi[:, None]))
        # Unique keys: block membership first, then 32 random bits, then the index as tie-break;
        # the NUM_KEEP largest keys are kept (= trim uniformly among the blocks, or top up
        # uniformly from the rest).
        offs = view[:, None] * stride + NUM_CENTRES + p[None, :]
        score = tl.randint(seed, offs).to(tl.uint32, bitcast=True).to(tl.int64)
        key = (kept.to(tl.int64) << (32 + IDX_BITS)) | (score << IDX_BITS) | p[None, :]
        key = tl.where(valid, key, -1)
        # Bitwise search for the NUM_KEEP-th largest key.
        threshold = tl.zeros((VIEWS,), dtype=tl.int64)
        for i in range(33 + IDX_BITS):
            cand = threshold | (tl.full((VIEWS,), 1, tl.int64) << (32 + IDX_BITS - i))
            count = tl.sum((key >= cand[:, None]).to(tl.int32), axis=1)
            threshold = tl.where(count >= NUM_KEEP, cand, threshold)
        keep = (key >= threshold[:, None]) & valid
        tl.store(mask_ptr + view[:, None] * P + p[None, :], (~keep).to(tl.int8), mask=valid)
        slot = tl.cumsum(keep.to(tl.int32), axis=1) - 1
        tl.store(keep_ptr + view[:, None] * NUM_KEEP + slot, p[None, :].to(tl.int64), mask=keep)


def inverse_block_mask_triton(
    num_views: int,
    grid: Tuple[int, int],
    mask_prob: float = 0.8,
    mask_length: int = 5,
    mask_prob_adjust: float = 0.07,
    generator: Optional[torch.Generator] = None,
    device=None,
    views_per_program: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The Triton version of ``inverse_block_mask_reference`` (same rules and exact counts, a
    different random stream). Returns (mask bool [V, P], keep_index int64 [V, num_keep])."""
    rows, cols = grid
    num_patches = rows * cols
    num_centres, num_keep = mask_counts(num_patches, mask_prob, mask_length, mask_prob_adjust)
    device = torch.device(device) if device is not None else torch.device("cpu")
    seed_device = generator.device if generator is not None else device
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, generator=generator,
                         device=seed_device).to(device)
    if views_per_program is None:  # the interpreter runs programs one by one: give each many views
        views_per_program = 1 if device.type == "cuda" else 256
    return _inverse_block_mask_op(seed, num_views, rows, cols, num_centres, num_keep, mask_length,
                                  views_per_program)


@torch.library.custom_op("sslam_kernels::inverse_block_mask", mutates_args=())
def _inverse_block_mask_op(seed: torch.Tensor, num_views: int, rows: int, cols: int, num_centres: int,
                           num_keep: int, mask_length: int, views_per_program: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The kernel launch as a ``torch.library`` op: the masks of a seed (int64 [1], on the
    device), so code that draws them compiles with torch.compile (the seed is drawn outside)."""
    num_patches = rows * cols
    mask = _empty(num_views, num_patches, dtype=torch.bool, device=seed.device)
    keep_index = _empty(num_views, num_keep, dtype=torch.int64, device=seed.device)
    if num_views == 0:
        return mask, keep_index
    views_per_program = triton.next_power_of_2(views_per_program)
    _inverse_block_mask_kernel[(triton.cdiv(num_views, views_per_program),)](
        seed, mask, keep_index, num_views, NUM_CENTRES=num_centres, NUM_KEEP=num_keep,
        ROWS=rows, COLS=cols, LO=mask_length // 2, HI=mask_length - 1 - mask_length // 2,
        IDX_BITS=max(1, (num_patches - 1).bit_length()), BLOCK_P=triton.next_power_of_2(num_patches),
        VIEWS=views_per_program, num_warps=4)
    return mask, keep_index


@_inverse_block_mask_op.register_fake
def _(seed, num_views, rows, cols, num_centres, num_keep, mask_length, views_per_program):
    return (seed.new_empty(num_views, rows * cols, dtype=torch.bool),
            seed.new_empty(num_views, num_keep, dtype=torch.int64))


def inverse_block_mask(
    num_views: int,
    grid: Tuple[int, int],
    mask_prob: float = 0.8,
    mask_length: int = 5,
    mask_prob_adjust: float = 0.07,
    generator: Optional[torch.Generator] = None,
    device=None,
    return_keep_index: bool = False,
):
    """Inverse block masks for ``num_views`` views of a ``grid = (time, freq)`` patch grid
    (docs/method.md §4): Triton on CUDA, ``inverse_block_mask_reference`` otherwise.

    Returns mask bool [V, time * freq] (True = masked, exactly P - num_keep per row), and with
    ``return_keep_index`` also keep_index int64 [V, num_keep], the visible positions ascending.
    ``generator`` (CPU or on ``device``) seeds the draw; the Triton and reference streams differ.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and triton_available:
        mask, keep_index = inverse_block_mask_triton(num_views, grid, mask_prob, mask_length,
                                                     mask_prob_adjust, generator, device)
        return (mask, keep_index) if return_keep_index else mask
    mask = inverse_block_mask_reference(num_views, grid, mask_prob, mask_length, mask_prob_adjust,
                                        generator, device)
    if not return_keep_index:
        return mask
    num_keep = mask_counts(grid[0] * grid[1], mask_prob, mask_length, mask_prob_adjust)[1]
    return mask, keep_index_from_mask(mask, num_keep)
