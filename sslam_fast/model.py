"""The encoder (student and teacher share it) and the CNN decoder of SSLAM / EAT (docs/method.md §3, 6)."""
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cpu_gemm
from .attention import attention
from .config import SSLAMConfig
from .implementation import FUSED


def sincos_table(embed_dim: int, time_patches: int, freq_patches: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positions [time_patches * freq_patches, embed_dim], time-major.

    The first half of the channels encodes the frequency index, the second half the time index
    (the MAE/EAT convention); each half is [sin, cos] over geometric frequencies.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4 for the 2-D sin-cos table, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    t, f = torch.meshgrid(torch.arange(time_patches, dtype=torch.float64),
                          torch.arange(freq_patches, dtype=torch.float64), indexing="ij")

    def encode(pos):
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(f), encode(t)], dim=1).float()


def layer_norm(x: torch.Tensor, normalized_shape, weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm that returns x's dtype, statistics in fp32, also under autocast.

    CUDA autocast runs ``layer_norm`` in fp32 and returns fp32, which turns a bf16 residual stream
    into an fp32 one; here autocast is off around the op, which reads and writes x's dtype and
    accumulates in fp32 (torch's kernels do for bf16 / fp16); the affine parameters are cast to
    x's dtype. Without autocast and for fp32 x it is ``F.layer_norm``, bit for bit.
    """
    with torch.autocast(x.device.type, enabled=False):
        weight = None if weight is None else weight.to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
        return F.layer_norm(x, normalized_shape, weight, bias, eps)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters and checkpoints) whose output keeps the input dtype under
    autocast (``layer_norm``); with ``ops.layer_norm == "autocast"`` it is nn.LayerNorm's forward
    (fp32 out under CUDA autocast), as the original code runs."""

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps=eps)
        self.ops = FUSED  # how the ops run: set from outside with implementation.set_implementation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ops.layer_norm == "autocast":
            return super().forward(x)
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``self(x + residual)``; with ``ops.add_layer_norm`` the add is fused into the norm."""
        if self.ops.layer_norm == "autocast" or self.ops.add_layer_norm is None:
            return self(x + residual)
        return self.ops.add_layer_norm(x, residual, self.weight, self.bias, self.eps)


class _ResidualLinear(torch.autograd.Function):
    """(x @ W^T (+ b), x): a linear layer whose input also feeds a residual add. The backward
    takes both gradients of x at once and writes grad_x = grad_residual + grad_y @ W as one GEMM
    (the residual gradient enters as the GEMM's accumulator) instead of a GEMM and a separate add
    over the whole activation. Computes in the autocast dtype when autocast is on, as F.linear."""

    @staticmethod
    def forward(ctx, x, weight, bias, onednn):
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        with torch.autocast(device_type, enabled=False):
            xc, wc = x.to(dtype), weight.to(dtype)
            ctx.onednn = onednn and cpu_gemm.applies(xc, wc)
            y = (cpu_gemm.matmul if ctx.onednn else F.linear)(xc, wc, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(xc, wc)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y, x.view_as(x)

    @staticmethod
    def backward(ctx, grad_y, grad_residual):
        xc, wc = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        gy = grad_y.reshape(-1, grad_y.shape[-1]).to(wc.dtype)
        residual = None if grad_residual is None else grad_residual.reshape(-1, xc.shape[-1]).to(wc.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            if ctx.onednn:
                grad_x = cpu_gemm.grad_input(gy, wc, residual)
            elif residual is None:
                grad_x = gy @ wc
            else:
                grad_x = torch.addmm(residual, gy, wc)
            grad_x = grad_x.view(xc.shape).to(x_dtype)
        if ctx.needs_input_grad[1]:
            x2d = xc.reshape(-1, xc.shape[-1])
            grad_w = (cpu_gemm.grad_weight(gy, x2d) if ctx.onednn else gy.t() @ x2d).to(w_dtype)
        if b_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = gy.sum(0).to(b_dtype)
        return grad_x, grad_w, grad_b, None


def residual_linear(x: torch.Tensor, linear_weight: torch.Tensor, bias: Optional[torch.Tensor], fused: bool,
                    onednn: bool = False):
    """(linear(x), x for the residual add); ``fused``: their gradients meet in one GEMM
    (``_ResidualLinear``); ``onednn``: fp32 on an x86 CPU through oneDNN (``cpu_gemm``)."""
    if fused and torch.is_grad_enabled() and x.requires_grad:
        return _ResidualLinear.apply(x, linear_weight, bias, onednn)
    return linear(x, linear_weight, bias, onednn), x


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], onednn: bool) -> torch.Tensor:
    """``F.linear``; ``onednn``: through oneDNN where ``cpu_gemm.applies`` (the fused implementation)."""
    return cpu_gemm.linear(x, weight, bias) if onednn else F.linear(x, weight, bias)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, mode: str = "auto"):
        super().__init__()
        self.num_heads = num_heads
        self.mode = mode  # the configured mode (SSLAMConfig.attention); ops.attention overrides it
        self.ops = FUSED  # how the ops run: set from outside with implementation.set_implementation
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(x)[0]

    def attend(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(attention output, x for the residual add; see ``residual_linear``)."""
        B, N, C = x.shape
        qkv, x = residual_linear(x, self.qkv.weight, self.qkv.bias, self.ops.residual_gemm, self.ops.cpu_gemm)
        # q, k, v as [B, H, N, Dh] views of the packed qkv: their gradients stack straight back into
        # its layout (no extra copy in the backward)
        q, k, v = (t.transpose(1, 2) for t in qkv.view(B, N, 3, self.num_heads, C // self.num_heads).unbind(2))
        out = attention(q, k, v, self.ops.attention or self.mode)
        return linear(out.transpose(1, 2).reshape(B, N, C), self.proj.weight, self.proj.bias, self.ops.cpu_gemm), x


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.ops = FUSED  # how the ops run: set from outside with implementation.set_implementation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform(x)[0]

    def transform(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(MLP output, x for the residual add; see ``residual_linear``)."""
        onednn = self.ops.cpu_gemm
        if onednn and cpu_gemm.applies_without_grad(x, self.fc1.weight, self.fc1.bias):  # GELU in the GEMM's epilogue
            h = cpu_gemm.matmul(x, self.fc1.weight, self.fc1.bias, gelu=True)
            return cpu_gemm.matmul(h, self.fc2.weight, self.fc2.bias), x
        # compiled for the CPU, the bias goes inside the GEMM: torch 2.13's inductor corrupts the heap on
        # a bias-free mm + bias + GELU at some token counts (129 for ViT-B; benchmarks/RESULTS.md)
        if self.ops.bias_gelu is None or (x.device.type == "cpu" and torch.compiler.is_compiling()):
            h, x = residual_linear(x, self.fc1.weight, self.fc1.bias, self.ops.residual_gemm, onednn)
            return linear(F.gelu(h), self.fc2.weight, self.fc2.bias, onednn), x
        # bias-free matmul, then bias + GELU in one pass (its backward reduces the bias gradient)
        h, x = residual_linear(x, self.fc1.weight, None, self.ops.residual_gemm, onednn)
        return linear(self.ops.bias_gelu(h, self.fc1.bias), self.fc2.weight, self.fc2.bias, onednn), x


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a residual branch for a random ``rate`` of the samples, scale the rest."""
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - rate)
    return x * keep.div_(1.0 - rate)


class Block(nn.Module):
    """Post-LN transformer block that also returns its MLP output r (the teachers' target source).

    ``drop_path``: the stochastic-depth rate of both residual branches in training (0 in
    pretraining; fine-tuning sets it with ``Encoder.set_drop_path``)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float, attn_mode: str, drop_path: float = 0.0):
        super().__init__()
        self.attn = Attention(dim, num_heads, attn_mode)
        self.norm1 = LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm2 = LayerNorm(dim, eps=eps)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        a, x = self.attn.attend(x)
        x = self.norm1.add_forward(x, drop_path(a, self.drop_path, self.training))
        r, x = self.mlp.transform(x)
        return self.norm2.add_forward(x, drop_path(r, self.drop_path, self.training)), r


def as_fbank_batch(fbank: torch.Tensor, num_mel_bins: int, patch_size: int, max_frames: int) -> torch.Tensor:
    """Accept [B, T, F] or [B, 1, T, F]; return [B, 1, T, F] after checking T and F."""
    if fbank.dim() == 3:
        fbank = fbank.unsqueeze(1)
    if fbank.dim() != 4 or fbank.shape[1] != 1:
        raise ValueError(f"fbank must be [B, T, {num_mel_bins}] or [B, 1, T, {num_mel_bins}], got {list(fbank.shape)}")
    T, Fb = fbank.shape[-2:]
    if Fb != num_mel_bins:
        raise ValueError(f"fbank has {Fb} mel bins, the model expects {num_mel_bins}")
    if T % patch_size or not 0 < T <= max_frames:
        raise ValueError(f"fbank has {T} frames; it must be a positive multiple of {patch_size} up to {max_frames}")
    return fbank


class Encoder(nn.Module):
    """Patch embedding + fixed positions, CLS, LayerNorm, post-LN blocks (no final norm)."""

    def __init__(self, cfg: SSLAMConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.patch_embed = nn.Conv2d(1, D, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.register_buffer("pos_table", sincos_table(D, cfg.max_time_patches, cfg.freq_patches), persistent=False)
        self.norm = LayerNorm(D, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(
            Block(D, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps, cfg.attention) for _ in range(cfg.depth)
        )
        self.ops = FUSED  # how the ops run: set from outside with implementation.set_implementation
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # BERT-style init of the linear layers as in fairseq; xavier on the flattened patch kernel.
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token)

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth rising linearly from 0 in the first block to ``rate`` in the last."""
        for i, block in enumerate(self.blocks):
            block.drop_path = rate * i / max(1, len(self.blocks) - 1)

    @property
    def max_frames(self) -> int:
        return self.cfg.max_time_patches * self.cfg.patch_size

    def patchify(self, fbank: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, F] -> patch embeddings [B, P, D] (P = T/16 * F/16, time-major), no positions."""
        fbank = as_fbank_batch(fbank, self.cfg.num_mel_bins, self.cfg.patch_size, self.max_frames)
        return self.patch_embed(fbank.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)

    def positions(self, num_patches: int) -> torch.Tensor:
        return self.pos_table[:num_patches]

    def tokens(self, fbank: torch.Tensor, keep_index: Optional[torch.Tensor] = None, clone: int = 1) -> torch.Tensor:
        """Encoder input: CLS, then the patch embeddings plus positions, [B, 1 + P, D]; with
        ``keep_index`` [B * clone, K] (visible patches, ascending), view v takes the visible patches
        of clip v // clone: [B * clone, 1 + K, D]. Positions, gather and CLS are one fused op."""
        patches = self.patchify(fbank)
        return self.ops.embed_mask_gather(patches, self.positions(patches.shape[1]), self.cls_token, keep_index, clone)

    def run_blocks(self, x: torch.Tensor, collect: bool = False) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """LayerNorm then the blocks on [N, 1 + L, D] (CLS first); returns the output and, when
        ``collect``, each block's MLP output without the CLS position."""
        x = self.norm(x)
        layers = []
        for block in self.blocks:
            x, r = block(x)
            if collect:
                layers.append(r[:, 1:])
        return x, layers

    def forward(self, fbank: torch.Tensor, keep_index: Optional[torch.Tensor] = None, clone: int = 1) -> torch.Tensor:
        """Encode [B, 1, T, F] fbank: [B, 1 + P, D] (CLS first), or the masked views of
        ``tokens(fbank, keep_index, clone)``. Every parameter is used inside this forward, so ZeRO-3
        can gather them around it."""
        return self.run_blocks(self.tokens(fbank, keep_index, clone))[0]

    def extract_features(self, fbank: torch.Tensor, granularity: str = "all") -> torch.Tensor:
        """Features of [B, T, 128] or [B, 1, T, 128] fbank (T a multiple of 16, up to 12288 frames).

        "all": [B, 1 + P, D] (CLS first); "frame": the patch tokens [B, P, D]; "utterance": CLS [B, D].
        """
        if granularity not in ("all", "frame", "utterance"):
            raise ValueError(f"granularity must be 'all', 'frame' or 'utterance', got {granularity!r}")
        x = self.forward(fbank)
        if granularity == "frame":
            return x[:, 1:]
        if granularity == "utterance":
            return x[:, 0]
        return x


class CNNDecoder(nn.Module):
    """Residual [grouped conv 3x3 -> LayerNorm over channels (no affine) -> GELU] x L, then Linear.

    The fast layout is channels-last throughout: [V, P, D] tokens are already NHWC, so the convs
    read and write NHWC (each call takes a channels-last copy of its small weight; the parameters
    stay contiguous, as DeepSpeed's flat buffers and broadcasts need), LayerNorm + GELU + residual run as one
    op over the contiguous last dim (``sslam_kernels.norm_gelu_residual``) and no transpose
    copies are made. ``ops.decoder_layout == "transposed"`` runs the
    original's NCHW layout with its transposes.
    """

    def __init__(self, cfg: SSLAMConfig):
        super().__init__()
        D = cfg.embed_dim
        self.eps = cfg.decoder_norm_eps
        self.convs = nn.ModuleList(
            nn.Conv2d(D, D, kernel_size=cfg.decoder_kernel, padding=cfg.decoder_kernel // 2, groups=cfg.decoder_groups)
            for _ in range(cfg.decoder_layers)
        )
        self.proj = nn.Linear(D, D)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.ops = FUSED  # how the ops run: set from outside with implementation.set_implementation

    def forward(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """x: [V, P, D] tokens on a (time, freq) patch grid -> predictions [V, P, D]."""
        if self.ops.decoder_layout == "transposed":
            return self._forward_transposed(x, grid)
        V, P, D = x.shape
        h = x.reshape(V, *grid, D)  # NHWC
        for conv in self.convs:
            weight = conv.weight.contiguous(memory_format=torch.channels_last)
            y = conv._conv_forward(h.permute(0, 3, 1, 2), weight, conv.bias).permute(0, 2, 3, 1)
            h = self.ops.norm_gelu_residual(y, h, self.eps)  # h + GELU(LayerNorm(y)), one pass
        return linear(h.reshape(V, P, D), self.proj.weight, self.proj.bias, self.ops.cpu_gemm)

    def _forward_transposed(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        V, P, D = x.shape
        h = x.transpose(1, 2).reshape(V, D, *grid)
        for conv in self.convs:
            y = conv(h)
            y = F.layer_norm(y.transpose(1, 3), (D,), eps=self.eps).transpose(1, 3)
            h = h + F.gelu(y)
        return self.proj(h.reshape(V, D, P).transpose(1, 2))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
