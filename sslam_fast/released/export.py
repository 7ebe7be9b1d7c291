"""``sslam-fast export``: a checkpoint of any supported format to safetensors, a Hugging Face
style folder, the original fairseq layout or an ONNX encoder."""
import json
import os
import warnings

import torch

from ..serialization import atomic_save
from .encoder import load_encoder
from .formats import fairseq_checkpoint, hf_folder, read_weights, safetensors_tensors

FORMATS = ("safetensors", "hf", "fairseq", "onnx")


def _contiguous(tensors):
    return {k: v.detach().contiguous() for k, v in tensors.items()}


def export_safetensors(src: str, out: str) -> None:
    from safetensors.torch import save_file

    tensors, meta = safetensors_tensors(read_weights(src))
    save_file(_contiguous(tensors), out, metadata=meta)


def export_hf(src: str, out: str) -> None:
    from safetensors.torch import save_file

    config, tensors = hf_folder(read_weights(src))
    os.makedirs(out, exist_ok=True)
    save_file(_contiguous(tensors), os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def export_fairseq(src: str, out: str) -> None:
    atomic_save(fairseq_checkpoint(read_weights(src)), out)


def export_onnx(src: str, out: str, which: str = "student", opset: int = 17) -> None:
    """The encoder as ONNX: input ``fbank`` [batch, frames, 128] (frames a multiple of 16), output
    ``tokens`` [batch, 1 + frames / 16 * 8, D]; batch and frames are dynamic axes."""
    encoder_to_onnx(load_encoder(src, which), out, opset)  # on the CPU: the fused ops take their plain PyTorch paths


def encoder_to_onnx(encoder, out: str, opset: int = 17) -> None:
    """``export_onnx`` of a loaded ``AudioEncoder`` (its attention set to eager, which ONNX traces)."""
    for block in encoder.encoder.blocks:
        block.attn.mode = "eager"  # matmul + softmax, whatever attention the checkpoint's config names
    example = torch.zeros(2, 1024, encoder.config.num_mel_bins)
    with warnings.catch_warnings():  # the shape checks are traced as constants; the graph has none
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(encoder, (example,), out, input_names=["fbank"], output_names=["tokens"],
                          dynamic_axes={"fbank": {0: "batch", 1: "frames"}, "tokens": {0: "batch", 1: "tokens"}},
                          opset_version=opset, dynamo=False)


def export(src: str, fmt: str, out: str, which: str = "student") -> None:
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "onnx":
        export_onnx(src, out, which)
    else:
        {"safetensors": export_safetensors, "hf": export_hf, "fairseq": export_fairseq}[fmt](src, out)
