"""``sslam-fast extract`` and ``sslam-fast tag``: files through a released model.

Each file is decoded (channels averaged, resampled to 16 kHz) and windowed as in
``released/hear.py``, normalised with the statistics the checkpoint states; windows of several files are encoded together, ``batch_size`` at a time, on
the GPU when there is one. A file that cannot be decoded (missing, corrupt, empty, shorter than
one 25 ms frame, NaN/Inf) is reported and skipped; the caller exits non-zero when any was.
"""
import os
from typing import Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import torch
from tqdm import tqdm

from ..data.audio import MAX_SECONDS, AudioError, load_audio, probe
from ..data.manifest import load_manifest
from .classes import audioset_classes
from .encoder import AudioClassifier, AudioEncoder, load_classifier, load_encoder
from .formats import InputSettings
from .hear import encode_windows, fbank_windows, pool_clips


def expand_inputs(inputs: Iterable[str]) -> List[str]:
    """Audio files in order: a ``.tsv`` (fairseq manifest) or a folder stands for its entries."""
    files = []
    for item in inputs:
        if os.path.isdir(item) or item.endswith(".tsv"):
            manifest = load_manifest(item)
            files.extend(manifest.path(i) for i in range(len(manifest)))
        else:
            files.append(item)
    return files


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _within_limit(files: List[str], max_seconds: float, bad: List[Tuple[str, str]]) -> List[str]:
    """The files whose header allows decoding them and says at most ``max_seconds``; the others go
    to ``bad`` with the reason."""
    kept = []
    for path in files:
        try:
            probe(path, max_seconds=max_seconds)
        except AudioError as err:
            bad.append((path, err.reason))
            continue
        kept.append(path)
    return kept


def _windows_of(files: List[str], input: InputSettings, device: str, bad: List[Tuple[str, str]], progress: bool):
    """Yield (file, windows [W, L, 128], frames) for each file that decodes."""
    for path in tqdm(files, desc="files", unit="file", disable=not progress):
        try:
            wave = load_audio(path)
            windows, frames = fbank_windows(wave.to(device), input)
        except AudioError as err:
            bad.append((path, err.reason))
            continue
        yield path, windows, frames


def _batched(items, batch_size: int):
    """Group (file, windows, frames) items until they hold at least ``batch_size`` windows."""
    group, count = [], 0
    for item in items:
        group.append(item)
        count += item[1].shape[0]
        if count >= batch_size:
            yield group
            group, count = [], 0
    if group:
        yield group


def _run(model, input, files, device, batch_size, progress, bad):
    """Yield (file, tokens of its windows [W, ...], frames), encoding windows of several files at once."""
    for group in _batched(_windows_of(files, input, device, bad, progress), batch_size):
        out = encode_windows(model, torch.cat([w for _, w, _ in group]), batch_size)
        start = 0
        for path, windows, frames in group:
            yield path, out[start : start + windows.shape[0]], frames
            start += windows.shape[0]


def _output_names(files: List[str]) -> Dict[str, str]:
    names, used = {}, set()
    for i, path in enumerate(files):
        stem = os.path.splitext(os.path.basename(path))[0] or f"input_{i}"
        name = stem if stem not in used else f"{stem}_{i}"
        used.add(name)
        names[path] = name
    return names


def extract_files(checkpoint: Union[str, AudioEncoder], inputs: Iterable[str], out: str, granularity: str = "utterance",
                  which: str = "student", batch_size: int = 8, device: Optional[str] = None,
                  progress: bool = True, max_seconds: float = MAX_SECONDS) -> Tuple[List[str], List[Tuple[str, str]]]:
    """Features of each input: "utterance" [D] (mean over windows of the CLS token), "frame"
    [R, 8, D] (patch tokens of the rows inside the clip), "all" [W, 1 + P, D] (each window's
    encoder output). ``checkpoint`` is a path (``load_encoder``) or a loaded ``AudioEncoder``.
    ``out`` ending in ``.npz`` gets one archive keyed by input path, else it is a folder with one
    ``<stem>.npy`` per input. A file longer than ``max_seconds`` is refused (a bad file). Returns
    (files written, [(bad file, reason)])."""
    device = device or default_device()
    files = expand_inputs(inputs)
    encoder = (checkpoint if isinstance(checkpoint, AudioEncoder) else load_encoder(checkpoint, which)).to(device)
    bad, written, archive = [], [], {}
    names = _output_names(files)
    to_npz = out.endswith(".npz")
    if not to_npz:
        os.makedirs(out, exist_ok=True)
    for path, tokens, frames in _run(encoder, encoder.input, _within_limit(files, max_seconds, bad), device,
                                     batch_size, progress, bad):
        array = pool_clips(encoder, tokens, 1, frames)[granularity][0].cpu().numpy()
        if to_npz:
            archive[path] = array
        else:
            np.save(os.path.join(out, names[path] + ".npy"), array)
        written.append(path)
    if to_npz:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        np.savez(out, **archive)
    return written, bad


class _Probabilities(torch.nn.Module):
    """The classifier's per-class probabilities of each window (sigmoid, or softmax for single-label heads)."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, fbank):
        return self.classifier.probabilities(fbank)


def tag_files(checkpoint: Union[str, AudioClassifier], files: Iterable[str], top_k: int = 5, batch_size: int = 8,
              device: Optional[str] = None, progress: bool = False,
              max_seconds: float = MAX_SECONDS) -> Tuple[List[dict], List[Tuple[str, str]]]:
    """Top-k classes of each file: the probabilities of each window (the sigmoid of the logits, or
    their softmax for a single-label fine-tune), the maximum over windows (an event anywhere in the
    clip counts). ``checkpoint`` is a path (``load_classifier``) or a loaded ``AudioClassifier``; a
    file longer than ``max_seconds`` is refused (a bad file). Returns ([{"file", "labels": [{"index",
    "mid", "name", "probability"}]}], [(bad file, reason)]); "mid" is the AudioSet id of AudioSet
    heads, else ""."""
    device = device or default_device()
    classifier = (checkpoint if isinstance(checkpoint, AudioClassifier) else load_classifier(checkpoint)).to(device)
    audioset = classifier.num_classes == 527 and classifier.labels == [c.name for c in audioset_classes()]
    mids = [c.mid for c in audioset_classes()] if audioset else [""] * classifier.num_classes
    bad, results = [], []
    files = _within_limit(expand_inputs(files), max_seconds, bad)
    for path, probs, _ in _run(_Probabilities(classifier), classifier.input, files, device, batch_size, progress, bad):
        clip = probs.max(dim=0).values
        values, indices = torch.topk(clip, min(top_k, clip.shape[0]))
        results.append({"file": path, "labels": [
            {"index": int(i), "mid": mids[int(i)], "name": classifier.labels[int(i)], "probability": round(float(v), 4)}
            for v, i in zip(values, indices)]})
    return results, bad
