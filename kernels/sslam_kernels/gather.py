"""Moving patch rows between the full grid and the visible set, in one pass each way.

- ``embed_mask_gather``: out[v] = cat(prefix, (patches[v // clone] + pos)[keep_index[v]]), i.e.
  positional add, visible-patch gather, CLS prepend and the clone_batch expansion in one kernel
  (no [V, P, D] copy is materialised). Backward sums the clones' gradients per clip without
  atomics (deterministic), through the inverse index map.
- ``decoder_input_scatter``: out[v] = noise[v] with visible[v, k] put back at keep_index[v, k].
  Backward is a gather.

Each has a plain-indexing PyTorch reference (``*_reference``), used on CPU and as the test oracle.
The Triton paths are ``torch.library`` custom ops (``torch.ops.sslam_kernels.*``) with fake
(meta) implementations and registered backward ops, so models using them compile with
``torch.compile(fullgraph=True)``.
"""
from typing import Optional

import torch

from ._triton import tl, triton, triton_available, use_triton_for

_empty = torch.empty  # every kernel output is allocated here (tests poison it)

BLOCK_R = 16


def _prefix_2d(cls: Optional[torch.Tensor], dim: int) -> Optional[torch.Tensor]:
    return None if cls is None else cls.reshape(-1, dim)


def embed_mask_gather_reference(patches: torch.Tensor, pos: Optional[torch.Tensor],
                                cls: Optional[torch.Tensor], keep_index: Optional[torch.Tensor],
                                clone: int = 1, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Plain-indexing reference of ``embed_mask_gather`` (same arguments, same result)."""
    N, P, D = patches.shape
    x = patches.float() if pos is None else patches.float() + pos.float()
    x = x.repeat_interleave(clone, dim=0)
    if keep_index is not None:
        x = x[torch.arange(x.shape[0], device=x.device)[:, None], keep_index]
    prefix = _prefix_2d(cls, D)
    if prefix is not None:
        x = torch.cat([prefix.float().expand(x.shape[0], -1, -1), x], dim=1)
    return x.to(out_dtype or patches.dtype)


def decoder_input_scatter_reference(visible: torch.Tensor, keep_index: torch.Tensor,
                                    noise: torch.Tensor) -> torch.Tensor:
    """Plain-indexing reference of ``decoder_input_scatter``."""
    out = noise.to(visible.dtype).clone()
    out[torch.arange(out.shape[0], device=out.device)[:, None], keep_index] = visible
    return out


def inverse_index(keep_index: torch.Tensor, num_patches: int) -> torch.Tensor:
    """int32 [V, P]: k where keep_index[v, k] == p, else -1."""
    V, K = keep_index.shape
    inv = torch.full((V, num_patches), -1, dtype=torch.int32, device=keep_index.device)
    slots = torch.arange(K, dtype=torch.int32, device=keep_index.device).expand(V, K)
    return inv.scatter_(1, keep_index.long(), slots)


def _block_d(D: int) -> int:
    return min(256, triton.next_power_of_2(D))


if triton_available:

    @triton.jit
    def _gather_rows_kernel(out_ptr, src_ptr, pos_ptr, prefix_ptr, idx_ptr, K,
                            s_src_n, s_src_p, s_src_d, s_pos_p, s_pos_d, s_pre_r, s_pre_d,
                            D: tl.constexpr, CLONE: tl.constexpr, PREFIX: tl.constexpr,
                            HAS_POS: tl.constexpr, HAS_INDEX: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        # out[v, j] = prefix[j] for j < PREFIX, else src[v // CLONE, idx[v, j - PREFIX]] (+ pos).
        v = tl.program_id(0)
        j = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        L = PREFIX + K
        is_patch = (j >= PREFIX) & (j < L)
        if HAS_INDEX:
            idx = tl.load(idx_ptr + v.to(tl.int64) * K + (j - PREFIX), mask=is_patch, other=0)
        else:
            idx = j - PREFIX
        idx = idx.to(tl.int64)
        src_row = src_ptr + (v // CLONE).to(tl.int64) * s_src_n + idx * s_src_p
        out_row = out_ptr + (v.to(tl.int64) * L + j) * D
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dm = (d < D)[None, :]
            x = tl.load(src_row[:, None] + d[None, :] * s_src_d, mask=is_patch[:, None] & dm,
                        other=0.0).to(tl.float32)
            if HAS_POS:
                x += tl.load(pos_ptr + idx[:, None] * s_pos_p + d[None, :] * s_pos_d,
                             mask=is_patch[:, None] & dm, other=0.0).to(tl.float32)
            if PREFIX > 0:
                is_pre = (j < PREFIX)[:, None]
                pre = tl.load(prefix_ptr + j[:, None] * s_pre_r + d[None, :] * s_pre_d,
                              mask=is_pre & dm, other=0.0).to(tl.float32)
                x = tl.where(is_pre, pre, x)
            tl.store(out_row[:, None] + d[None, :], x.to(out_ptr.dtype.element_ty),
                     mask=(j < L)[:, None] & dm)

    @triton.jit
    def _scatter_rows_kernel(out_ptr, rows_ptr, fill_ptr, inv_ptr, P, L, SUM_ROWS_FROM,
                             s_rows_v, s_rows_k, s_rows_d, s_fill_v, s_fill_p, s_fill_d,
                             D: tl.constexpr, CLONE: tl.constexpr, FILL: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        # out[n, p] = sum over the CLONE views v of clip n of rows[v, SUM_ROWS_FROM + inv[v, p]]
        # where 0 <= inv[v, p] < L - SUM_ROWS_FROM; elsewhere 0 (FILL == 0), fill[n, p]
        # (FILL == 1, dense) or fill[n, inv[n, p] - (L - SUM_ROWS_FROM)] (FILL == 2, compact, as
        # a gather from cat(rows, fill) would give). Every output element is written.
        n = tl.program_id(0)
        p = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        pm = p < P
        num_rows = L - SUM_ROWS_FROM
        out_row = out_ptr + (n.to(tl.int64) * P + p) * D
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dm = (d < D)[None, :]
            acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
            hit_any = tl.zeros((BLOCK_R,), dtype=tl.int1)
            k = tl.zeros((BLOCK_R,), dtype=tl.int64)
            for c in range(CLONE):
                v = (n * CLONE + c).to(tl.int64)
                k = tl.load(inv_ptr + v * P + p, mask=pm, other=-1).to(tl.int64)
                hit = (k >= 0) & (k < num_rows)
                hit_any |= hit
                acc += tl.load(rows_ptr + v * s_rows_v + (SUM_ROWS_FROM + k)[:, None] * s_rows_k
                               + d[None, :] * s_rows_d, mask=hit[:, None] & dm,
                               other=0.0).to(tl.float32)
            if FILL > 0:
                if FILL == 1:
                    fill_row = p
                else:
                    fill_row = k - num_rows
                fill = tl.load(fill_ptr + n.to(tl.int64) * s_fill_v + fill_row[:, None] * s_fill_p
                               + d[None, :] * s_fill_d, mask=(~hit_any & pm)[:, None] & dm,
                               other=0.0).to(tl.float32)
                acc = tl.where(hit_any[:, None], acc, fill)
            tl.store(out_row[:, None] + d[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=pm[:, None] & dm)


def _gather_rows(src, pos, prefix, index, clone, num_views, out_dtype):
    """Launch ``_gather_rows_kernel``; returns [num_views, PREFIX + K, D] of ``out_dtype``."""
    _, P, D = src.shape
    K = P if index is None else index.shape[1]
    index = None if index is None else index.contiguous()
    n_prefix = 0 if prefix is None else prefix.shape[0]
    out = _empty(num_views, n_prefix + K, D, dtype=out_dtype, device=src.device)
    if out.numel() == 0:
        return out
    pos_strides = (0, 0) if pos is None else pos.stride()
    pre_strides = (0, 0) if prefix is None else prefix.stride()
    grid = (num_views, triton.cdiv(n_prefix + K, BLOCK_R))
    _gather_rows_kernel[grid](
        out, src, src if pos is None else pos, src if prefix is None else prefix,
        src if index is None else index, K, *src.stride(), *pos_strides, *pre_strides,
        D=D, CLONE=clone, PREFIX=n_prefix, HAS_POS=pos is not None, HAS_INDEX=index is not None,
        BLOCK_R=BLOCK_R, BLOCK_D=_block_d(D), num_warps=4)
    return out


def _scatter_rows(rows, fill, inv, num_out, clone, rows_from, out_dtype, compact_fill=False):
    """Launch ``_scatter_rows_kernel``; returns [num_out, P, D] of ``out_dtype``."""
    P, D = inv.shape[1], rows.shape[2]
    out = _empty(num_out, P, D, dtype=out_dtype, device=rows.device)
    if out.numel() == 0:
        return out
    fill_strides = (0, 0, 0) if fill is None else fill.stride()
    _scatter_rows_kernel[(num_out, triton.cdiv(P, BLOCK_R))](
        out, rows, rows if fill is None else fill, inv, P, rows.shape[1], rows_from,
        *rows.stride(), *fill_strides, D=D, CLONE=clone,
        FILL=0 if fill is None else (2 if compact_fill else 1),
        BLOCK_R=BLOCK_R, BLOCK_D=_block_d(D), num_warps=4)
    return out


# The Triton paths as torch.library ops: opaque to torch.compile (shapes from the fake
# implementations), differentiable through their registered backward ops.

@torch.library.custom_op("sslam_kernels::embed_mask_gather", mutates_args=())
def _embed_mask_gather_op(patches: torch.Tensor, pos: Optional[torch.Tensor], prefix: Optional[torch.Tensor],
                          keep_index: Optional[torch.Tensor], clone: int, out_dtype: torch.dtype) -> torch.Tensor:
    index = None if keep_index is None else keep_index.contiguous()
    return _gather_rows(patches, pos, prefix, index, clone, patches.shape[0] * clone, out_dtype)


@_embed_mask_gather_op.register_fake
def _(patches, pos, prefix, keep_index, clone, out_dtype):
    N, P, D = patches.shape
    K = P if keep_index is None else keep_index.shape[1]
    n_prefix = 0 if prefix is None else prefix.shape[0]
    return patches.new_empty(N * clone, n_prefix + K, D, dtype=out_dtype)


@torch.library.custom_op("sslam_kernels::embed_mask_gather_backward", mutates_args=())
def _embed_mask_gather_backward_op(grad_out: torch.Tensor, keep_index: Optional[torch.Tensor], num_clips: int,
                                   num_patches: int, clone: int, n_prefix: int,
                                   out_dtype: torch.dtype) -> torch.Tensor:
    """The patches' gradient [num_clips, num_patches, D]: the clones' rows summed per clip."""
    grad_out = grad_out.contiguous()
    V = grad_out.shape[0]
    if keep_index is None:
        keep_index = torch.arange(num_patches, device=grad_out.device).expand(V, num_patches)
    inv = inverse_index(keep_index, num_patches)
    return _scatter_rows(grad_out, None, inv, num_clips, clone, n_prefix, out_dtype)


@_embed_mask_gather_backward_op.register_fake
def _(grad_out, keep_index, num_clips, num_patches, clone, n_prefix, out_dtype):
    return grad_out.new_empty(num_clips, num_patches, grad_out.shape[2], dtype=out_dtype)


def _embed_mask_gather_setup(ctx, inputs, output):
    patches, pos, prefix, keep_index, clone, _ = inputs
    ctx.save_for_backward(keep_index)
    ctx.shape = patches.shape
    ctx.clone = clone
    ctx.n_prefix = 0 if prefix is None else prefix.shape[0]
    ctx.dtypes = (patches.dtype, None if pos is None else pos.dtype, None if prefix is None else prefix.dtype)


def _embed_mask_gather_backward(ctx, grad_out):
    (index,) = ctx.saved_tensors
    N, P, _ = ctx.shape
    p_dtype, pos_dtype, pre_dtype = ctx.dtypes
    need_pos = ctx.needs_input_grad[1]
    grad_patches = grad_pos = grad_prefix = None
    if ctx.needs_input_grad[0] or need_pos:
        grad = _embed_mask_gather_backward_op(grad_out, index, N, P, ctx.clone, ctx.n_prefix,
                                              torch.float32 if need_pos else p_dtype)
        grad_pos = grad.sum(0).to(pos_dtype) if need_pos else None
        grad_patches = grad.to(p_dtype) if ctx.needs_input_grad[0] else None
    if ctx.n_prefix and ctx.needs_input_grad[2]:
        grad_prefix = grad_out[:, :ctx.n_prefix].float().sum(0).to(pre_dtype)
    return grad_patches, grad_pos, grad_prefix, None, None, None


_embed_mask_gather_op.register_autograd(_embed_mask_gather_backward, setup_context=_embed_mask_gather_setup)


@torch.library.custom_op("sslam_kernels::decoder_input_scatter", mutates_args=())
def _decoder_input_scatter_op(visible: torch.Tensor, keep_index: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    inv = inverse_index(keep_index.contiguous(), noise.shape[1])
    return _scatter_rows(visible, noise, inv, noise.shape[0], 1, 0, visible.dtype)


@_decoder_input_scatter_op.register_fake
def _(visible, keep_index, noise):
    return visible.new_empty(noise.shape)


@torch.library.custom_op("sslam_kernels::gather_rows", mutates_args=())
def _gather_rows_op(src: torch.Tensor, index: torch.Tensor, num_prefix: int, out_dtype: torch.dtype) -> torch.Tensor:
    """out[v] = cat(num_prefix zero rows, src[v, index[v]]) of ``out_dtype``."""
    zeros = src.new_zeros(num_prefix, src.shape[2]) if num_prefix else None
    return _gather_rows(src, None, zeros, index.contiguous(), 1, src.shape[0], out_dtype)


@_gather_rows_op.register_fake
def _(src, index, num_prefix, out_dtype):
    return src.new_empty(src.shape[0], num_prefix + index.shape[1], src.shape[2], dtype=out_dtype)


def _decoder_input_scatter_setup(ctx, inputs, output):
    visible, keep_index, _ = inputs
    ctx.save_for_backward(keep_index)
    ctx.visible_dtype = visible.dtype


def _decoder_input_scatter_backward(ctx, grad_out):
    (index,) = ctx.saved_tensors
    return _gather_rows_op(grad_out.contiguous(), index, 0, ctx.visible_dtype), None, None


_decoder_input_scatter_op.register_autograd(_decoder_input_scatter_backward,
                                            setup_context=_decoder_input_scatter_setup)


@torch.library.custom_op("sslam_kernels::decoder_input_gather", mutates_args=())
def _decoder_input_gather_op(x: torch.Tensor, ids_restore: torch.Tensor, mask_tokens: torch.Tensor,
                             num_extra: int) -> torch.Tensor:
    return _scatter_rows(x, mask_tokens, ids_restore.contiguous(), x.shape[0], 1, num_extra, x.dtype,
                         compact_fill=True)


@_decoder_input_gather_op.register_fake
def _(x, ids_restore, mask_tokens, num_extra):
    return x.new_empty(x.shape[0], ids_restore.shape[1], x.shape[2])


def _decoder_input_gather_setup(ctx, inputs, output):
    x, ids_restore, mask_tokens, num_extra = inputs
    ctx.save_for_backward(ids_restore)
    ctx.num_extra = num_extra
    ctx.num_visible = x.shape[1] - num_extra
    ctx.dtypes = (x.dtype, mask_tokens.dtype)


def _decoder_input_gather_backward(ctx, grad_out):
    (restore,) = ctx.saved_tensors
    V, T, _ = grad_out.shape
    grad_out = grad_out.contiguous()
    position = torch.empty_like(restore, dtype=torch.int64).scatter_(
        1, restore.long(), torch.arange(T, device=restore.device).expand(V, T))
    x_dtype, m_dtype = ctx.dtypes
    grad_x = grad_m = None
    if ctx.needs_input_grad[0]:
        grad_x = _gather_rows_op(grad_out, position[:, :ctx.num_visible], ctx.num_extra, x_dtype)
    if ctx.needs_input_grad[2]:
        grad_m = _gather_rows_op(grad_out, position[:, ctx.num_visible:], 0, m_dtype)
    return grad_x, None, grad_m, None


_decoder_input_gather_op.register_autograd(_decoder_input_gather_backward,
                                           setup_context=_decoder_input_gather_setup)


def _check_gather_args(patches, pos, prefix, keep_index, clone):
    if patches.dim() != 3:
        raise ValueError(f"patches must be [N, P, D], got {tuple(patches.shape)}")
    N, P, D = patches.shape
    if pos is not None and tuple(pos.shape) != (P, D):
        raise ValueError(f"pos must be [{P}, {D}], got {tuple(pos.shape)}")
    if keep_index is not None and (keep_index.dim() != 2 or keep_index.shape[0] != N * clone):
        raise ValueError(f"keep_index must be [{N * clone}, K], got {tuple(keep_index.shape)}")
    if prefix is not None and prefix.numel() % D:
        raise ValueError(f"cls must hold whole rows of {D}, got {tuple(prefix.shape)}")


def embed_mask_gather(patches: torch.Tensor, pos: Optional[torch.Tensor],
                      cls: Optional[torch.Tensor], keep_index: Optional[torch.Tensor],
                      clone: int = 1, use_triton: Optional[bool] = None,
                      out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Positional add + visible-patch gather + CLS prepend (+ clone_batch expansion), fused.

    patches: [N, P, D] patch embeddings of N clips (fp32 / bf16 / fp16; any strides).
    pos: [P, D] positional table (any float dtype) or None. Usually fixed; if it requires grad
        it gets one (the sum over all views, as a learned table would).
    cls: prefix tokens prepended without positions: [1, 1, D], [D] or [C, D] (C tokens), or None.
    keep_index: int64 [V, K], V = N * clone, the visible positions of each view (unique per
        row; ascending keeps the grid order), or None for all P positions in order.
    clone: views per clip; view v uses clip v // clone (no repeat_interleave copy is made).
    use_triton: None = Triton for CUDA tensors (reference otherwise); True / False forces.
    out_dtype: dtype of the result (default patches.dtype).
    Returns [V, C + K, D] of out_dtype: out[v, :C] = cls,
        out[v, C + k] = patches[v // clone, keep_index[v, k]] + pos[keep_index[v, k]]
    (sums in fp32, rounded once). Differentiable w.r.t. patches, cls and (if it requires grad) pos.
    """
    _check_gather_args(patches, pos, cls, keep_index, clone)
    use_triton = use_triton_for(use_triton, patches, "embed_mask_gather")
    if not use_triton:
        return embed_mask_gather_reference(patches, pos, cls, keep_index, clone, out_dtype)
    return _embed_mask_gather_op(patches, pos, _prefix_2d(cls, patches.shape[2]), keep_index, clone,
                                 out_dtype or patches.dtype)


def decoder_input_scatter(visible: torch.Tensor, keep_index: torch.Tensor, noise: torch.Tensor,
                          use_triton: Optional[bool] = None) -> torch.Tensor:
    """Decoder input: noise everywhere, the visible outputs put back at their positions.

    visible: [V, K, D] encoder outputs of the visible patches (CLS already dropped; any strides).
    keep_index: int64 [V, K], unique positions in [0, P) per row.
    noise: [V, P, D] fill for the masked positions (e.g. N(0, 0.01) draws); no gradient.
    use_triton: None = Triton for CUDA tensors (reference otherwise); True / False forces.
    Returns [V, P, D] of visible.dtype; differentiable w.r.t. visible.
    """
    V, K, D = visible.shape
    if keep_index.shape != (V, K) or noise.shape[0] != V or noise.shape[2] != D:
        raise ValueError(f"visible {tuple(visible.shape)}, keep_index {tuple(keep_index.shape)} "
                         f"and noise {tuple(noise.shape)} do not match")
    use_triton = use_triton_for(use_triton, visible, "decoder_input_scatter")
    if not use_triton:
        return decoder_input_scatter_reference(visible, keep_index, noise)
    return _decoder_input_scatter_op(visible, keep_index, noise)


def decoder_input_gather_reference(x: torch.Tensor, ids_restore: torch.Tensor,
                                   mask_tokens: torch.Tensor, num_extra: int = 0) -> torch.Tensor:
    """data2vec 2.0 / EAT's decoder input: gather(cat(x[:, num_extra:], mask_tokens), ids_restore)."""
    x_ = torch.cat([x[:, num_extra:], mask_tokens.to(x.dtype)], dim=1)
    return torch.gather(x_, 1, ids_restore.long()[..., None].expand(-1, -1, x.shape[2]))


def decoder_input_gather(x: torch.Tensor, ids_restore: torch.Tensor, mask_tokens: torch.Tensor,
                         num_extra: int = 0, use_triton: Optional[bool] = None) -> torch.Tensor:
    """The decoder input in data2vec 2.0 / EAT's layout, without the concatenated copy.

    x: [V, num_extra + K, D] encoder output (extra tokens such as CLS first, then the K visible
        patches in the order of the mask's ids_keep).
    ids_restore: int [V, P] (a permutation of 0..P-1 per row): position p takes visible row
        ids_restore[v, p] if it is < K, else mask_tokens[v, ids_restore[v, p] - K].
    mask_tokens: [V, P - K, D] fill rows (noise). use_triton: as ``embed_mask_gather``.
    Returns [V, P, D] of x.dtype; differentiable w.r.t. x and mask_tokens.
    """
    V, L, D = x.shape
    if ids_restore.dim() == 3:  # EAT keeps it expanded over D
        ids_restore = ids_restore[:, :, 0]
    if ids_restore.shape[0] != V or mask_tokens.shape != (V, ids_restore.shape[1] - L + num_extra, D):
        raise ValueError(f"x {tuple(x.shape)}, ids_restore {tuple(ids_restore.shape)} and mask_tokens "
                         f"{tuple(mask_tokens.shape)} do not match")
    use_triton = use_triton_for(use_triton, x, "decoder_input_gather")
    if not use_triton:
        return decoder_input_gather_reference(x, ids_restore, mask_tokens, num_extra)
    return _decoder_input_gather_op(x, ids_restore, mask_tokens, num_extra)
