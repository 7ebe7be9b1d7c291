"""Clips of any length through the encoder, and the HEAR 2021 API (``sslam_fast.hear``).

Windowing policy (the model sees windows of the clip length it was trained on, ``input.target_length``
frames: 1024, 10.24 s, for the released models), normalised with the checkpoint's own statistics
(``AudioEncoder.input``; the AudioSet values for original checkpoints):

- the 16 kHz clip has its mean removed and gives n Kaldi fbank frames (10 ms apart, 25 ms long,
  docs/method.md §2) over its whole length;
- the frames are cut into W = max(1, ceil(n / L)) non-overlapping windows of L = target_length
  frames; the last one is zero-padded in the log-mel domain, then all are normalised, exactly as
  the original pads a short clip (a clip of at most L frames is one window, identical to
  ``fbank_features(..., target_length=L, norm_mean, norm_std)``);
- each window is encoded on its own; the utterance (scene) embedding of the clip is the mean over
  its windows of their CLS tokens;
- the patch tokens of consecutive windows form one grid of patch rows (16 frames, 160 ms, each
  with 8 frequency patches); only the R = ceil(n / 16) rows that start inside the clip are kept,
  so a clip shorter than one patch (16 frames, 0.175 s) still gives one row. A timestamp
  embedding is the mean of a row's 8 frequency patches, at the row's centre,
  160 * r + 80 ms (the centre of its frames 16r ... 16r + 15 on the 10 ms frame grid);
- a finer timestamp hop h (``hop_ms`` 10, 20, 40 or 80: h / 10 frames dividing the 16 of a row)
  runs the encoder 160 / h times, on the clip's frames from frame s = 0, h/10, 2h/10, ... on: the
  rows of pass s start at frames s + 16 r, so together they give one embedding every h ms, at
  frame t's row centre 10 t + 80 ms. The cost is 160 / h encoder passes instead of one (4 at the
  40 ms of ``sslam_fast.hear_40ms``, the module for HEAR's music-transcription tasks, which ask
  for at most 50 ms); the scene embedding stays one pass.

A clip shorter than one 25 ms frame (400 samples) has no frame and is refused (``AudioError``).
"""
import logging
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.audio import MAX_SECONDS, SAMPLE_RATE, AudioError, kaldi_fbank, normalise, num_frames, subtract_mean
from .encoder import AudioEncoder, load_encoder
from .formats import InputSettings
from .inference import for_inference

logger = logging.getLogger(__name__)

FRAME_MS = 10.0


def fbank_windows(waveform: torch.Tensor, input: InputSettings = InputSettings()) -> Tuple[torch.Tensor, int]:
    """16 kHz clips [N] or [B, N] (equal length) -> (windows [B * W, L, 128] clip by clip,
    normalised with ``input``'s statistics, L = ``input.target_length``; the number n of fbank
    frames of each clip)."""
    return windows_of(raw_fbank(waveform), input)


def raw_fbank(waveform: torch.Tensor) -> torch.Tensor:
    """16 kHz clips [N] or [B, N] (equal length) -> their Kaldi fbank [B, n, 128], not normalised."""
    batch = waveform[None] if waveform.dim() == 1 else waveform
    if num_frames(batch.shape[1]) == 0:
        raise AudioError("<audio>", f"{batch.shape[1]} samples at 16 kHz, shorter than one 25 ms frame")
    return kaldi_fbank(subtract_mean(batch.float()))


def windows_of(raw: torch.Tensor, input: InputSettings = InputSettings()) -> Tuple[torch.Tensor, int]:
    """Fbank frames [B, n, 128] -> (normalised windows [B * W, L, 128], n), as ``fbank_windows``."""
    n, length = raw.shape[1], input.target_length
    windows = max(1, math.ceil(n / length))
    raw = F.pad(raw, (0, 0, 0, windows * length - n))
    return normalise(raw, input.norm_mean, input.norm_std).reshape(raw.shape[0] * windows, length, raw.shape[-1]), n


@torch.no_grad()
def encode_windows(encoder: AudioEncoder, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Encoder tokens [N, 1 + P, D] of windows [N, L, 128], ``batch_size`` windows at a time."""
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
    """The encoder with the attributes the HEAR API asks for; timestamp embeddings every ``hop_ms``."""

    sample_rate = SAMPLE_RATE

    def __init__(self, encoder: AudioEncoder, batch_size: int = 8, hop_ms: float = 160.0,
                 max_seconds: float = MAX_SECONDS):
        super().__init__()
        row = encoder.patch_size
        hop = hop_ms / FRAME_MS
        if hop != int(hop) or int(hop) < 1 or row % int(hop):
            raise ValueError(f"hop_ms must be 10 ms times a divisor of the {row} frames of a patch row "
                             f"({', '.join(str(int(FRAME_MS * d)) for d in range(1, row + 1) if row % d == 0)}), got {hop_ms}")
        self.encoder = encoder
        self.batch_size = batch_size
        self.hop_frames = int(hop)
        self.max_seconds = max_seconds
        self.scene_embedding_size = encoder.embed_dim
        self.timestamp_embedding_size = encoder.embed_dim

    def _raw(self, audio: torch.Tensor) -> torch.Tensor:
        if audio.dim() != 2:
            raise ValueError(f"audio must be [n_sounds, n_samples] at 16 kHz, got {list(audio.shape)}")
        if audio.shape[1] > self.max_seconds * SAMPLE_RATE:
            raise AudioError("<audio>", f"{audio.shape[1] / SAMPLE_RATE:.1f} s, longer than max_seconds={self.max_seconds:g}")
        if not torch.isfinite(audio).all():
            raise AudioError("<audio>", "NaN or Inf samples")
        return raw_fbank(audio.to(next(self.encoder.parameters()).device))

    def _pool(self, raw: torch.Tensor) -> Tuple[Dict[str, torch.Tensor], int]:
        windows, frames = windows_of(raw, self.encoder.input)
        tokens = encode_windows(self.encoder, windows, self.batch_size)
        return pool_clips(self.encoder, tokens, raw.shape[0], frames), frames

    def features(self, audio: torch.Tensor) -> Tuple[Dict[str, torch.Tensor], int]:
        """``pool_clips`` of the clips, and their number of fbank frames."""
        return self._pool(self._raw(audio))

    def timestamp_rows(self, audio: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(embeddings [n, K, D], centres in ms [K]): one per ``hop_frames`` frames that start inside
        the clip, each the mean of the 8 frequency patches of the patch row starting there."""
        row, hop = self.encoder.patch_size, self.hop_frames
        raw = self._raw(audio)
        n = raw.shape[1]
        starts = torch.arange(0, n, hop)
        out = None
        for shift in range(0, min(row, n), hop):
            rows = self._pool(raw[:, shift:])[0]["frame"].mean(dim=2)  # rows start at frames shift + row * r
            if out is None:
                out = rows.new_empty(rows.shape[0], len(starts), rows.shape[-1])
            out[:, shift // hop :: row // hop] = rows
        return out, (starts + row / 2).float() * FRAME_MS


def load_model(model_file_path: str = "", which: str = "student", batch_size: int = 8,
               norm_mean: Optional[float] = None, norm_std: Optional[float] = None, hop_ms: float = 160.0,
               precision: str = "auto", device: str = "cpu") -> HearModel:
    """HEAR ``load_model``: any checkpoint ``load_encoder`` reads, fed with the normalisation it
    states (``norm_mean`` / ``norm_std`` override it); timestamp embeddings every ``hop_ms``
    (160: one encoder pass, the patch rows; 10, 20, 40 or 80: 160 / hop_ms passes); on the
    inference path of ``precision`` (``released/inference.py``; ``"fp32"`` forces fp32).
    ``model.encoder.path`` says which path runs it; it is also logged."""
    if not model_file_path:
        raise ValueError("load_model needs the path of a checkpoint (no weights are downloaded)")
    encoder = for_inference(load_encoder(model_file_path, which, norm_mean, norm_std), device, precision)
    logger.info(encoder.path.describe())
    return HearModel(encoder, batch_size, hop_ms).eval()


def get_scene_embeddings(audio: torch.Tensor, model: HearModel) -> torch.Tensor:
    """audio [n, samples] float at 16 kHz -> [n, D]: the mean over the windows of the CLS token."""
    return model.features(audio)[0]["utterance"]


def get_timestamp_embeddings(audio: torch.Tensor, model: HearModel) -> Tuple[torch.Tensor, torch.Tensor]:
    """audio [n, samples] float at 16 kHz -> (embeddings [n, K, D], timestamps in ms [n, K]): one
    every ``model.hop_frames`` frames (160 ms by default: each patch row), the mean of the 8
    frequency patches of the row starting there, at the row's centre."""
    if model.hop_frames == model.encoder.patch_size:
        features, _ = model.features(audio)
        frames = features["frame"].mean(dim=2)
        stamps = row_timestamps(frames.shape[1], model.encoder.patch_size).to(frames.device)
    else:
        frames, stamps = model.timestamp_rows(audio)
        stamps = stamps.to(frames.device)
    return frames, stamps.expand(frames.shape[0], -1)
