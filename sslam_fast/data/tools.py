"""Data tools: check a dataset ahead of training, normalisation statistics, demo data."""

from __future__ import annotations

import logging
import math
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import audio
from .loader import MAX_SECONDS, _worker_init, _worker_start_method, build_loader, read_clip
from .manifest import Manifest, ManifestError, load_manifest

logger = logging.getLogger(__name__)


class _CheckDataset(torch.utils.data.Dataset):
    """index -> (index, None) for a clip the loader would deliver, (index, reason) otherwise."""

    def __init__(self, manifest: Manifest, max_seconds: float):
        self.manifest, self.max_seconds = manifest, max_seconds

    def __len__(self) -> int:
        return len(self.manifest)

    def __getitem__(self, index: int):
        try:
            read_clip(self.manifest.path(index), self.max_seconds)
        except audio.AudioError as err:
            return index, err.reason
        return index, None


def check_manifest(source: str, num_workers: int = 0, max_seconds: float = MAX_SECONDS) -> Tuple[Manifest, List[Tuple[int, str]]]:
    """Decode and resample every entry of a manifest (or folder) as the loader would, in
    `num_workers` processes. Returns (the manifest, [(entry index, reason), ...] for the entries the
    loader would skip); entry i is manifest line i + 2."""
    manifest = load_manifest(source)
    loader = torch.utils.data.DataLoader(
        _CheckDataset(manifest, max_seconds), batch_size=None, num_workers=num_workers,
        worker_init_fn=_worker_init if num_workers else None,
        multiprocessing_context=_worker_start_method() if num_workers else None)
    return manifest, [(index, reason) for index, reason in loader if reason is not None]


def write_clean_manifest(manifest: Manifest, drop: Sequence[int], out_path: str) -> Optional[str]:
    """`manifest` without the entries `drop`, written to out_path with the same root. When the
    manifest has a label file beside it (`<stem>.lbl`), the same lines are dropped from it and it is
    written as `<out stem>.lbl`, so labels stay aligned; returns that path (or None)."""
    dropped = set(drop)
    keep = [i for i in range(len(manifest)) if i not in dropped]
    Manifest(out_path, manifest.root, [manifest.paths[i] for i in keep], [manifest.sizes[i] for i in keep]).write(out_path)
    labels = os.path.splitext(manifest.source)[0] + ".lbl"
    if not os.path.isfile(labels):
        return None
    with open(labels, "r", encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    if len(lines) != len(manifest):
        raise ManifestError(f"{labels}: {len(lines)} label lines for {len(manifest)} entries of {manifest.source}")
    out_labels = os.path.splitext(out_path)[0] + ".lbl"
    with open(out_labels, "w", encoding="utf-8") as f:
        f.writelines(lines[i] if lines[i].endswith("\n") else lines[i] + "\n" for i in keep)
    return out_labels


# ----------------------------------------------------------------------------------------------
# Normalisation statistics (docs/method.md §2.6)
# ----------------------------------------------------------------------------------------------


def norm_stats(manifest: str, target_length: int = audio.TARGET_LENGTH, max_clips: Optional[int] = None, num_workers: int = 0) -> Tuple[float, float, int]:
    """Mean and std of the un-normalised, zero-padded/cropped [target_length, 128] fbanks of a
    dataset (every element of every clip, as AST/SSLAM compute theirs: padding included), the
    values step 6 divides by. Bad files are skipped. Returns (mean, std, clips used)."""
    loader = build_loader(
        manifest, batch_size=1, backend="torch", num_workers=num_workers, infinite=False, drop_last=False,
        target_length=target_length, norm_mean=0.0, norm_std=0.5,
    )
    total = total_sq = 0.0
    count = clips = 0
    for batch in loader:
        x = batch["fbank"].double()
        total += float(x.sum())
        total_sq += float((x * x).sum())
        count += x.numel()
        clips += 1
        if max_clips is not None and clips >= max_clips:
            break
    if clips == 0:
        raise ValueError(f"{manifest}: no readable clip")
    mean = total / count
    return mean, math.sqrt(max(total_sq / count - mean * mean, 0.0)), clips


# ----------------------------------------------------------------------------------------------
# Demo data: deterministic synthetic audio for a CPU-only first run
# ----------------------------------------------------------------------------------------------


def _demo_clip(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    t = np.arange(n) / sr
    clip = 0.003 * rng.standard_normal(n)
    for _ in range(rng.integers(1, 4)):
        kind = rng.integers(5)
        start = rng.uniform(0, 0.6) * n / sr
        length = rng.uniform(0.5, 4.0)
        env = ((t >= start) & (t < start + length)) * np.exp(-(t - start).clip(0) * rng.uniform(0.2, 3.0))
        amp = rng.uniform(0.05, 0.3)
        if kind == 0:  # tone
            event = np.sin(2 * np.pi * rng.uniform(100, 4000) * t)
        elif kind == 1:  # chirp
            f0, f1 = rng.uniform(100, 7000, size=2)
            event = np.sin(2 * np.pi * (f0 * (t - start) + (f1 - f0) * (t - start) ** 2 / (2 * length)))
        elif kind == 2:  # noise burst
            event = rng.standard_normal(n)
        elif kind == 3:  # harmonic stack
            f0 = rng.uniform(80, 400)
            event = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 9) if k * f0 < sr / 2)
        else:  # click train
            event = np.zeros(n)
            event[np.arange(int(start * sr), n, int(sr / rng.uniform(2, 20)))] = 1.0
            env = (t >= start).astype(float)
        clip += amp * env * event
    return np.clip(clip, -1.0, 1.0).astype(np.float32)


def make_demo_dataset(out_dir: str, num_clips: int = 64, seconds: float = 10.0, sample_rate: int = 16000, seed: int = 0) -> str:
    """Write `num_clips` varied synthetic wav clips (tones, chirps, noise bursts, harmonic stacks,
    clicks) and a fairseq manifest `out_dir/train.tsv`; the same arguments give the same files.
    Returns the manifest path."""
    import soundfile as sf

    audio_dir = os.path.join(out_dir, "audio")
    os.makedirs(audio_dir, exist_ok=True)
    n = int(round(seconds * sample_rate))
    paths = [f"audio/demo_{i:05d}.wav" for i in range(num_clips)]
    for i, rel in enumerate(paths):
        clip = _demo_clip(np.random.default_rng([seed, i]), n, sample_rate)
        sf.write(os.path.join(out_dir, rel), clip, sample_rate, subtype="PCM_16")
    manifest = os.path.join(out_dir, "train.tsv")
    Manifest(manifest, os.path.abspath(out_dir), paths, [n] * num_clips).write(manifest)
    return manifest
