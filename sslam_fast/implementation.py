"""How the model's ops run: one switch, applied from outside the model.

The model computes the same maths whichever implementation runs it; each module that calls an op
reads it from its ``ops`` attribute, and ``set_implementation`` replaces that attribute on every
module of a model (and compiles the networks for "compiled"):

- ``"fused"`` (the default): the ``sslam_kernels`` ops, which run Triton kernels on CUDA tensors
  and their PyTorch reference elsewhere;
- ``"reference"``: the plain PyTorch reference of every op (the parity oracle, and what a reader
  holds next to docs/method.md);
- ``"compiled"``: the fused ops, compiled by ``torch.compile``: for an ``SSLAMPretrainer`` its
  static-shape ``step`` (student, decoder, teacher passes and losses, forward and backward) as one
  graph with ``fullgraph=True``, which CUDA graphs can replay whole (the draw before it stays
  eager); for an ``Encoder`` every transformer block. Parameter names and checkpoints are
  unchanged;
- ``"original"``: the same maths executed the way the original EAT / SSLAM code executes it (the
  baseline of step-time and traffic comparisons): the reference ops, eager attention with an fp32
  softmax in every Attention module whatever ``SSLAMConfig.attention`` says, ``nn.LayerNorm``'s
  autocast behaviour (fp32 out on CUDA), the NCHW decoder with its transposes, the per-tensor EMA loop, the gather-based losses (``objectives.gathered_losses``, a
  host sync) and bool-mask indexing of the mixed rows. Its
  fp16-weights / fp32-masters / loss-scaling side belongs to the trainer.

The implementation is not part of the config or of checkpoints: a model loads the same way whichever
implementation then runs it.
"""
import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

import sslam_kernels

IMPLEMENTATIONS = ("fused", "reference", "compiled", "original")


@dataclass(frozen=True)
class Ops:
    """The ops the model calls; each has the signature of its ``sslam_kernels`` function."""

    name: str
    inverse_block_mask: Callable
    embed_mask_gather: Callable
    decoder_input_scatter: Callable
    layer_averaged_target: Callable
    ema_backend: str  # FusedEMA's backend: "auto" (Triton for CUDA tensors) or "torch"
    attention: Optional[str] = None  # every Attention module's mode; None: the configured one
    masked_regression: Callable = sslam_kernels.masked_regression  # the dense losses' one op
    norm_gelu_residual: Callable = sslam_kernels.norm_gelu_residual  # the channels-last decoder's epilogue
    bias_gelu: Optional[Callable] = sslam_kernels.bias_gelu  # the MLP's fc1 bias + GELU; None: nn.Linear then F.gelu
    add_layer_norm: Optional[Callable] = sslam_kernels.add_layer_norm  # the blocks' residual add + LayerNorm; None: unfused
    residual_gemm: bool = True  # qkv / fc1 input gradients and the residual gradient summed in one GEMM
    cpu_gemm: bool = True  # fp32 Linear layers on x86 CPUs through oneDNN (``cpu_gemm``); False: F.linear (MKL)
    # static shapes (the fast paths): dense losses, fixed-index mixed rows, no host sync in the step;
    # False: objectives.gathered_losses (nonzero) and bool-mask indexing, as the original code runs
    static_shapes: bool = True
    # under a bf16 / fp16 autocast the teacher passes run a low-precision shadow of the fp32 teacher
    # that the EMA update rewrites (SSLAMPretrainer.forward_teacher), instead of casting every pass
    teacher_shadow: bool = True
    layer_norm: str = "keep_dtype"  # model.LayerNorm: "keep_dtype" (bf16 stream) or "autocast" (nn.LayerNorm's)
    decoder_layout: str = "channels_last"  # CNNDecoder: "channels_last" or "transposed" (NCHW, the original's)


FUSED = Ops(
    name="fused",
    inverse_block_mask=sslam_kernels.inverse_block_mask,
    embed_mask_gather=sslam_kernels.embed_mask_gather,
    decoder_input_scatter=sslam_kernels.decoder_input_scatter,
    layer_averaged_target=sslam_kernels.layer_averaged_target,
    ema_backend="auto",
)
REFERENCE = Ops(
    name="reference",
    inverse_block_mask=sslam_kernels.inverse_block_mask_reference,
    embed_mask_gather=functools.partial(sslam_kernels.embed_mask_gather, use_triton=False),
    decoder_input_scatter=functools.partial(sslam_kernels.decoder_input_scatter, use_triton=False),
    layer_averaged_target=functools.partial(sslam_kernels.layer_averaged_target, use_triton=False),
    ema_backend="torch",
    masked_regression=functools.partial(sslam_kernels.masked_regression, use_triton=False),
    norm_gelu_residual=functools.partial(sslam_kernels.norm_gelu_residual, use_triton=False),
    bias_gelu=functools.partial(sslam_kernels.bias_gelu, use_triton=False),
    add_layer_norm=functools.partial(sslam_kernels.add_layer_norm, use_triton=False),
    cpu_gemm=False,
)
ORIGINAL = dataclasses.replace(REFERENCE, name="original", attention="eager", layer_norm="autocast",
                               decoder_layout="transposed", static_shapes=False, teacher_shadow=False,
                               bias_gelu=None, add_layer_norm=None, residual_gemm=False)


def set_implementation(model: nn.Module, name: str) -> nn.Module:
    """Run ``model`` (an ``SSLAMPretrainer`` or an ``Encoder``) with implementation ``name``; in place."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}, got {name!r}")
    from .model import Block
    from .pretrainer import SSLAMPretrainer

    ops = {"reference": REFERENCE, "original": ORIGINAL}.get(name, FUSED)
    for module in model.modules():
        if hasattr(module, "ops"):
            module.ops = ops
    if isinstance(model, SSLAMPretrainer):
        model.__dict__.pop("step", None)  # a compiled step of an earlier "compiled"
        if name == "compiled":
            compiled = torch.compile(model.step, fullgraph=True)

            def step(fbank, draws, *args, **kwargs):  # mix windows as a tensor: one graph for all draws
                return compiled(fbank, model.step_draws(draws), *args, **kwargs)
            model.step = step
    elif name == "compiled":
        for module in model.modules():
            if isinstance(module, Block):
                module.compile()
    return model
