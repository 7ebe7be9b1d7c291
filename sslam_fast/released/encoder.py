"""Released models as inference modules: ``load_encoder`` and ``load_classifier``.

Both read any form of checkpoint ``formats.read_weights`` reads (original pretraining or
fine-tuned fairseq checkpoints, this project's files and run checkpoints, exported safetensors,
Hugging Face style folders) through the safe loaders, and return a module in eval mode on the CPU,
in fp32, whose ``input`` (``InputSettings``) says how its fbank input must be normalised.
"""
import dataclasses
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import Encoder
from ..serialization import CheckpointError, names_the_file
from .classes import class_names
from .formats import HeadWeights, InputSettings, ReleasedWeights, _check_positions, _load_strict, read_weights

GRANULARITIES = ("all", "frame", "utterance")


class AudioEncoder(nn.Module):
    """The SSLAM / EAT encoder for inference.

    ``forward(fbank)``: normalised fbank ``[B, T, 128]`` or ``[B, 1, T, 128]`` (T a multiple of 16,
    at most ``max_frames``; the released models were trained on T = 1024, 10.24 s) -> tokens
    ``[B, 1 + P, D]``: the CLS token first, then the P = T/16 * 8 patch tokens, time-major (patch
    p covers frames 16 * (p // 8) ... + 15 and mel bins 16 * (p % 8) ... + 15).
    ``extract_features(fbank, granularity)``: "all" as forward, "frame" the patch tokens
    ``[B, P, D]``, "utterance" the CLS token ``[B, D]`` (the authors' three granularities).
    ``input``: the normalisation and clip length the model was trained with (what ``extract``,
    ``tag`` and the HEAR API feed it).
    """

    def __init__(self, encoder: Encoder, which: str = "student", input: InputSettings = InputSettings()):
        super().__init__()
        self.encoder = encoder
        self.which = which
        self.input = input
        self.found = ""  # what checkpoint this came from, in words (set by the loaders)

    @property
    def config(self):
        return self.encoder.cfg

    @property
    def embed_dim(self) -> int:
        return self.encoder.cfg.embed_dim

    @property
    def patch_size(self) -> int:
        return self.encoder.cfg.patch_size

    @property
    def freq_patches(self) -> int:
        return self.encoder.cfg.freq_patches

    @property
    def max_frames(self) -> int:
        return self.encoder.max_frames

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        return self.encoder(fbank)

    def extract_features(self, fbank: torch.Tensor, granularity: str = "all") -> torch.Tensor:
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        x = self.forward(fbank)
        return x[:, 1:] if granularity == "frame" else x[:, 0] if granularity == "utterance" else x


class AudioClassifier(nn.Module):
    """A fine-tuned model: encoder, pooling, optional ``fc_norm`` LayerNorm, ``head`` Linear.

    ``forward(fbank)`` (as ``AudioEncoder``) -> logits ``[B, num_classes]``; ``probabilities(fbank)``
    applies the sigmoid of multi-label heads (AudioSet) or the softmax of single-label fine-tunes
    (``task`` "multiclass"). ``labels[i]`` names logit i.
    Pooling as in the original fine-tuning code: "cls" takes the CLS token, "mean" averages the
    patch tokens, "lin_softmax" is its log-sigmoid weighted pooling over the patch tokens.
    """

    def __init__(self, encoder: AudioEncoder, head: HeadWeights):
        super().__init__()
        self.encoder = encoder
        self.pooling = head.pooling
        dim, classes = encoder.embed_dim, head.num_classes
        self.fc_norm = nn.LayerNorm(dim, eps=head.norm_eps) if head.norm_weight is not None else None
        self.head = nn.Linear(dim, classes)
        self.labels: List[str] = list(head.labels) if head.labels is not None else class_names(classes)
        self.task = head.task

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    @property
    def input(self) -> InputSettings:
        return self.encoder.input

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return tokens[:, 0]
        patches = tokens[:, 1:]
        if self.pooling == "mean":
            return patches.mean(dim=1)
        # LIN_SOFTMAX: per channel, sum(s^2) / sum(s) over the patches with s = sigmoid(x), mapped
        # back through the inverse sigmoid (computed in log space).
        dtype = patches.dtype
        log_s = F.logsigmoid(patches.float())
        pooled = (torch.logsumexp(2 * log_s, dim=1) - torch.logsumexp(log_s + 1e-6, dim=1)).clamp(max=0)
        pooled = pooled - torch.log(-torch.expm1(pooled))
        return torch.nan_to_num(pooled, nan=0.0, posinf=0.0, neginf=0.0).to(dtype)

    def probabilities(self, fbank: torch.Tensor) -> torch.Tensor:
        logits = self(fbank)
        return torch.softmax(logits, dim=-1) if self.task == "multiclass" else torch.sigmoid(logits)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.encoder(fbank))
        if self.fc_norm is not None:
            x = self.fc_norm(x)
        return self.head(x)


def _encoder(path: str, weights: ReleasedWeights, which: str, norm_mean: Optional[float] = None,
             norm_std: Optional[float] = None) -> AudioEncoder:
    if which not in ("student", "teacher"):
        raise ValueError(f"which must be 'student' or 'teacher', got {which!r}")
    state = weights.student if which == "student" else weights.teacher
    if state is None:
        raise CheckpointError(f"{path}: holds no teacher ({weights.source} checkpoint); use which='student'")
    encoder = Encoder(dataclasses.replace(weights.config, stage=1))
    if weights.positions is not None:
        _check_positions(path, weights.positions, encoder)
    _load_strict(path, which, encoder, state)
    model = AudioEncoder(encoder, which, weights.input.with_overrides(norm_mean, norm_std)).eval()
    model.found = f"checkpoint {path}: {weights.found}, {weights.source}"
    return model


@names_the_file
def load_encoder(path, which: str = "student", norm_mean: Optional[float] = None,
                 norm_std: Optional[float] = None) -> AudioEncoder:
    """The encoder of any supported checkpoint as an ``AudioEncoder`` in eval mode.

    ``which="student"`` (default) is the network the authors' feature extraction and fine-tuning
    use; ``"teacher"`` is the EMA teacher of a pretraining checkpoint (``model["_ema"]``).
    ``norm_mean`` / ``norm_std`` override the normalisation the checkpoint states (``.input``).
    """
    weights = read_weights(path)
    return _encoder(weights.path, weights, which, norm_mean, norm_std)


@names_the_file
def load_classifier(path, norm_mean: Optional[float] = None, norm_std: Optional[float] = None) -> AudioClassifier:
    """A fine-tuned checkpoint (original fairseq, a fine-tuning run of this project, exported
    safetensors or HF folder) as an ``AudioClassifier`` in eval mode: logits over its classes,
    named in ``labels`` (the fine-tuning run's label descriptors, or AudioSet's 527)."""
    weights = read_weights(path)
    path = weights.path
    if weights.head is None:
        raise CheckpointError(f"{path}: no classification head ({weights.source} checkpoint); "
                              "a pretraining checkpoint gives features through load_encoder")
    model = AudioClassifier(_encoder(path, weights, "student", norm_mean, norm_std), weights.head)
    head = weights.head
    state = {"weight": head.weight, "bias": head.bias}
    _load_strict(path, "head", model.head, state)
    if model.fc_norm is not None:
        _load_strict(path, "fc_norm", model.fc_norm, {"weight": head.norm_weight, "bias": head.norm_bias})
    return model.eval()

