"""``sslam-fast export``: a checkpoint of any supported form to safetensors, a Hugging Face
style folder, the original fairseq layout or an ONNX encoder. Every export carries the input
settings (``InputSettings``: norm_mean, norm_std, target_length) of its source, or the values given
to override them: in the safetensors metadata (``input``), config.json (``sslam_fast.input``), the
fairseq ``extra_state["sslam_fast"]`` and the ONNX model's metadata (``norm_mean``, ``norm_std``,
``target_length``)."""
import dataclasses
import json
import os
import warnings
from typing import Optional

import torch

from ..serialization import atomic_save
from .encoder import load_encoder
from .formats import ReleasedWeights, fairseq_checkpoint, hf_folder, read_weights, safetensors_tensors

FORMATS = ("safetensors", "hf", "fairseq", "onnx")


def _contiguous(tensors):
    return {k: v.detach().contiguous() for k, v in tensors.items()}


def _weights(src: str, norm_mean: Optional[float], norm_std: Optional[float]) -> ReleasedWeights:
    weights = read_weights(src)
    return dataclasses.replace(weights, input=weights.input.with_overrides(norm_mean, norm_std))


def export_safetensors(src: str, out: str, norm_mean: Optional[float] = None, norm_std: Optional[float] = None) -> None:
    from safetensors.torch import save_file

    tensors, meta = safetensors_tensors(_weights(src, norm_mean, norm_std))
    save_file(_contiguous(tensors), out, metadata=meta)


def export_hf(src: str, out: str, norm_mean: Optional[float] = None, norm_std: Optional[float] = None) -> None:
    from safetensors.torch import save_file

    config, tensors = hf_folder(_weights(src, norm_mean, norm_std))
    os.makedirs(out, exist_ok=True)
    save_file(_contiguous(tensors), os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def export_fairseq(src: str, out: str, norm_mean: Optional[float] = None, norm_std: Optional[float] = None) -> None:
    atomic_save(fairseq_checkpoint(_weights(src, norm_mean, norm_std)), out)


def export_onnx(src: str, out: str, which: str = "student", opset: int = 17, norm_mean: Optional[float] = None,
                norm_std: Optional[float] = None) -> None:
    """The encoder as ONNX: input ``fbank`` [batch, frames, 128] (frames a multiple of 16), normalised
    as the metadata says, output ``tokens`` [batch, 1 + frames / 16 * 8, D]; batch and frames are
    dynamic axes."""
    encoder_to_onnx(load_encoder(src, which, norm_mean, norm_std), out, opset)  # on the CPU: the fused ops take their plain PyTorch paths


def encoder_to_onnx(encoder, out: str, opset: int = 17) -> None:
    """``export_onnx`` of a loaded ``AudioEncoder`` (its attention set to eager, which ONNX traces);
    the model's normalisation goes into the file's metadata."""
    import onnx

    for block in encoder.encoder.blocks:
        block.attn.mode = "eager"  # matmul + softmax, whatever attention the checkpoint's config names
    example = torch.zeros(2, encoder.input.target_length, encoder.config.num_mel_bins)
    with warnings.catch_warnings():  # the shape checks are traced as constants; the graph has none
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(encoder, (example,), out, input_names=["fbank"], output_names=["tokens"],
                          dynamic_axes={"fbank": {0: "batch", 1: "frames"}, "tokens": {0: "batch", 1: "tokens"}},
                          opset_version=opset, dynamo=False)
    model = onnx.load(out)
    onnx.helper.set_model_props(model, {k: str(v) for k, v in encoder.input.to_dict().items()})
    onnx.save(model, out)


def export(src: str, fmt: str, out: str, which: str = "student", norm_mean: Optional[float] = None,
           norm_std: Optional[float] = None) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "onnx":
        export_onnx(src, out, which, norm_mean=norm_mean, norm_std=norm_std)
    else:
        {"safetensors": export_safetensors, "hf": export_hf, "fairseq": export_fairseq}[fmt](src, out, norm_mean, norm_std)
