"""Clips of any length through the encoder, and the HEAR 2021 API (``sslam_fast.hear``).

Windowing policy (the model sees 1024 frames, 10.24 s, as in training):

- the 16 kHz clip has its mean removed and gives n Kaldi fbank frames (10 ms apart, 25 ms long,
  docs/method.md §2) over its whole length;
- the frames are cut into W = max(1, ceil(n / 1024)) non-overlapping windows of 1024 frames; the
  last one is zero-padded in the log-mel domain, then all are normalised, exactly as the original
  pads a clip shorter than 10.24 s (a clip of at most 1024 frames is one window, identical to
  ``fbank_features``);
- each window is encoded on its own; the utterance (scene) embedding of the clip is the mean over
  its windows of their CLS tokens;
- the patch tokens of consecutive windows form one grid of patch rows (16 frames, 160 ms, each
  with 8 frequency patches); only the R = ceil(n / 16) rows that start inside the clip are kept,
  so a clip shorter than one patch (16 frames, 0.175 s) still gives one row. A timestamp
  embedding is the mean of a row's 8 frequency patches, at the row's centre,
  160 * r + 80 ms (the centre of its frames 16r ... 16r + 15 on the 10 ms frame grid).

A clip shorter than one 25 ms frame (400 samples) has no frame and is refused (``AudioError``).
"""
import logging
import math
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.audio import SAMPLE_RATE, AudioError, kaldi_fbank, normalise, num_frames, subtract_mean
from .encoder import AudioEncoder, load_encoder
from .inference import for_inference

logger = logging.getLogger(__name__)

WINDOW_FRAMES = 1024
FRAME_MS = 10.0


def fbank_windows(waveform: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """16 kHz clips [N] or [B, N] (equal length) -> (normalised windows [B * W, 1024, 128] clip by
    clip, the number n of fbank frames of each clip)."""
    batch = waveform[None] if waveform.dim() == 1 else waveform
    n = num_frames(batch.shape[1])
    if n == 0:
        raise AudioError("<audio>", f"{batch.shape[1]} samples at 16 kHz, shorter than one 25 ms frame")
    raw = kaldi_fbank(subtract_mean(batch.float()))
    windows = max(1, math.ceil(n / WINDOW_FRAMES))
    raw = F.pad(raw, (0, 0, 0, windows * WINDOW_FRAMES - n))
    return normalise(raw).reshape(batch.shape[0] * windows, WINDOW_FRAMES, raw.shape[-1]), n


@torch.no_grad()
def encode_windows(encoder: AudioEncoder, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Encoder tokens [N, 1 + P, D] of windows [N, 1024, 128], ``batch_size`` windows at a time."""
    device = next(encoder.parameters()).device
    out = [encoder(windows[i : i + batch_size].to(device)).float() for i in range(0, windows.shape[0], batch_size)]
    return torch.cat(out)


def pool_clips(encoder: AudioEncoder, tokens: torch.Tensor, clips: int, frames: int) -> Dict[str, torch.Tensor]:
    """Per-clip features from the tokens of its windows (``clips`` clips of ``frames`` fbank frames):
    "all" [B, W, 1 + P, D] (each window's encoder output), "frame" [B, R, 8, D] (the patch tokens of
    the R rows that start inside the clip), "utterance" [B, D] (mean of the windows' CLS tokens)."""
    per_clip = tokens.reshape(clips, -1, *tokens.shape[1:])
    rows = math.ceil(frames / encoder.patch_size)
    patches = per_clip[:, :, 1:].reshape(clips, -1, encoder.freq_patches, tokens.shape[-1])[:, :rows]
    return {"all": per_clip, "frame": patches, "utterance": per_clip[:, :, 0].mean(dim=1)}


def row_timestamps(rows: int, patch_size: int = 16) -> torch.Tensor:
    """Centres (ms) of patch rows 0 .. rows-1: patch_size * 10 ms apart, the first at half a row."""
    return (torch.arange(rows, dtype=torch.float32) * patch_size + patch_size / 2) * FRAME_MS


class HearModel(nn.Module):
    """The encoder with the attributes the HEAR API asks for."""

    sample_rate = SAMPLE_RATE

    def __init__(self, encoder: AudioEncoder, batch_size: int = 8):
        super().__init__()
        self.encoder = encoder
        self.batch_size = batch_size
        self.scene_embedding_size = encoder.embed_dim
        self.timestamp_embedding_size = encoder.embed_dim

    def features(self, audio: torch.Tensor) -> Tuple[Dict[str, torch.Tensor], int]:
        if audio.dim() != 2:
            raise ValueError(f"audio must be [n_sounds, n_samples] at 16 kHz, got {list(audio.shape)}")
        windows, frames = fbank_windows(audio.to(next(self.encoder.parameters()).device))
        tokens = encode_windows(self.encoder, windows, self.batch_size)
        return pool_clips(self.encoder, tokens, audio.shape[0], frames), frames


def load_model(model_file_path: str = "", which: str = "student", batch_size: int = 8,
               precision: str = "auto", device: str = "cpu") -> HearModel:
    """HEAR ``load_model``: any checkpoint ``load_encoder`` reads, on the inference path of
    ``precision`` (``released/inference.py``; ``"fp32"`` forces fp32). ``model.encoder.path`` says
    which path runs it; it is also logged."""
    if not model_file_path:
        raise ValueError("load_model needs the path of a checkpoint (no weights are downloaded)")
    encoder = for_inference(load_encoder(model_file_path, which), device, precision)
    logger.info(encoder.path.describe())
    return HearModel(encoder, batch_size).eval()


def get_scene_embeddings(audio: torch.Tensor, model: HearModel) -> torch.Tensor:
    """audio [n, samples] float at 16 kHz -> [n, D]: the mean over 1024-frame windows of the CLS token."""
    return model.features(audio)[0]["utterance"]


def get_timestamp_embeddings(audio: torch.Tensor, model: HearModel) -> Tuple[torch.Tensor, torch.Tensor]:
    """audio [n, samples] float at 16 kHz -> (embeddings [n, R, D], timestamps in ms [n, R]): one
    per 160 ms patch row, the mean of its 8 frequency patches, at the row's centre."""
    features, _ = model.features(audio)
    frames = features["frame"].mean(dim=2)
    stamps = row_timestamps(frames.shape[1], model.encoder.patch_size).to(frames.device)
    return frames, stamps.expand(frames.shape[0], -1)
