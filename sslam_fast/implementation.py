"""How the model's ops run: one switch, applied from outside the model.

The model computes the same maths whichever implementation runs it; each module that calls an op
reads it from its ``ops`` attribute, and ``set_implementation`` replaces that attribute on every
module of a model (and compiles the networks for "compiled"):

- ``"fused"`` (the default): the ``sslam_kernels`` ops, which run Triton kernels on CUDA tensors
  and their PyTorch reference elsewhere;
- ``"reference"``: the plain PyTorch reference of every op (the parity oracle, and what a reader
  holds next to docs/method.md);
- ``"compiled"``: the fused ops, with every transformer block and the decoder compiled by
  ``torch.compile`` (parameter names and checkpoints are unchanged).
"""
import functools
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

import sslam_kernels

IMPLEMENTATIONS = ("fused", "reference", "compiled")


@dataclass(frozen=True)
class Ops:
    """The ops the model calls; each has the signature of its ``sslam_kernels`` function."""

    name: str
    inverse_block_mask: Callable
    embed_mask_gather: Callable
    decoder_input_scatter: Callable
    layer_averaged_target: Callable
    ema_backend: str  # FusedEMA's backend: "auto" (Triton for CUDA tensors) or "torch"


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
)


def set_implementation(model: nn.Module, name: str) -> nn.Module:
    """Run ``model`` (an ``SSLAMPretrainer`` or an ``Encoder``) with implementation ``name``; in place."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}, got {name!r}")
    ops = REFERENCE if name == "reference" else FUSED
    for module in model.modules():
        if hasattr(module, "ops"):
            module.ops = ops
    if name == "compiled":
        from .model import Block, CNNDecoder

        for module in model.modules():
            if isinstance(module, (Block, CNNDecoder)):
                module.compile()
    return model
