"""``sslam-fast extract`` and ``sslam-fast tag``: files through a released model.

Each file is decoded (channels averaged, resampled to 16 kHz) and windowed as in
``released/hear.py``, normalised with the statistics the checkpoint states; windows of several
files are encoded together, ``batch_size`` at a time, on the GPU when there is one, on the
inference path of ``inference.py`` (bf16 on CPUs with native bf16). A file longer than
``STREAM_SECONDS`` is streamed instead (``stream.py``): its windows are decoded and encoded a batch
at a time, in memory bounded whatever its length. A file that cannot be decoded (missing, corrupt,
empty, shorter than one 25 ms frame, NaN/Inf, longer than ``max_seconds``) is reported and
skipped; the caller exits non-zero when any was.
"""
import math
import os
import time
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import torch
from tqdm import tqdm

from ..data.audio import MAX_RATE, AudioError, load_audio, probe
from ..data.manifest import load_manifest
from .classes import audioset_classes
from .encoder import AudioClassifier, AudioEncoder, load_classifier, load_encoder
from .formats import InputSettings
from .hear import FRAME_MS, encode_windows, fbank_windows, pool_clips, row_timestamps
from .inference import for_inference
from .stream import stream_windows

STREAM_SECONDS = 60.0
MAX_FILE_SECONDS = 24 * 3600.0  # extract / tag stream long files in bounded memory, so their default limit is a day


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


def _within_limit(files: List[str], max_seconds: float, bad: List[Tuple[str, str]]) -> List[Tuple[str, float]]:
    """(file, seconds by its header) of each file whose header allows decoding it and says at most
    ``max_seconds``; the others go to ``bad`` with the reason. ``max_seconds`` alone bounds the
    length: files over ``STREAM_SECONDS`` are streamed, never held whole."""
    kept = []
    for path in files:
        try:
            frames, rate, _ = probe(path, max_samples=math.ceil(max_seconds * MAX_RATE), max_seconds=max_seconds)
        except AudioError as err:
            bad.append((path, err.reason))
            continue
        kept.append((path, frames / rate))
    return kept


def _encode_group(model, group, batch_size: int):
    """Encode the windows of several whole files at once: (file, [(tokens [W, ...], frames)]) each."""
    if not group:
        return
    out = encode_windows(model, torch.cat([w for _, w, _ in group]), batch_size)
    start = 0
    for path, windows, frames in group:
        yield path, [(out[start : start + windows.shape[0]], frames)]
        start += windows.shape[0]


def _streamed(model, input: InputSettings, path: str, device: str, batch_size: int):
    """(tokens [k, ...], frames) of a long file's windows, decoded and encoded piece by piece."""
    block_seconds = batch_size * input.target_length * FRAME_MS / 1000
    for windows, frames in stream_windows(path, block_seconds=block_seconds, input=input):
        yield encode_windows(model, windows.to(device), batch_size), frames


def _run(model, input: InputSettings, files: List[Tuple[str, float]], device: str, batch_size: int, progress: bool,
         bad: List[Tuple[str, str]], reduce: Callable, stream_seconds: float, report: Callable[[str], None]):
    """Yield (file, reduce(pieces)) for each (file, seconds) that decodes, in order; pieces is an iterable of
    (tokens of k consecutive windows [k, ...], the fbank frames they cover). Files of at most
    ``stream_seconds`` are decoded whole and their windows encoded together, ``batch_size`` at a
    time; longer ones are streamed (``stream.py``) in bounded memory, with their real-time factor
    reported. ``input`` is the checkpoint's window length and normalisation."""
    group, count, seconds, start = [], 0, 0.0, time.perf_counter()
    for path, length in tqdm(files, desc="files", unit="file", disable=not progress):
        if length > stream_seconds:
            yield from ((p, reduce(pieces)) for p, pieces in _encode_group(model, group, batch_size))
            group, count, began = [], 0, time.perf_counter()
            try:
                result = reduce(_streamed(model, input, path, device, batch_size))
            except AudioError as err:
                bad.append((path, err.reason))
                continue
            seconds += result.seconds
            elapsed = time.perf_counter() - began
            report(f"{path}: {result.seconds:.1f} s of audio in {elapsed:.1f} s, real-time factor {elapsed / result.seconds:.4f}")
            yield path, result
            continue
        try:
            windows, frames = fbank_windows(load_audio(path).to(device), input)
        except AudioError as err:
            bad.append((path, err.reason))
            continue
        group.append((path, windows, frames))
        count += windows.shape[0]
        seconds += frames * FRAME_MS / 1000
        if count >= batch_size:
            yield from ((p, reduce(pieces)) for p, pieces in _encode_group(model, group, batch_size))
            group, count = [], 0
    yield from ((p, reduce(pieces)) for p, pieces in _encode_group(model, group, batch_size))
    if seconds:
        elapsed = time.perf_counter() - start
        report(f"{seconds:.1f} s of audio in {elapsed:.1f} s, real-time factor {elapsed / seconds:.4f}")


class _Features:
    """Per-file features from the pieces of its windows (see ``extract_files``)."""

    def __init__(self, encoder, granularity: str):
        self.encoder, self.granularity = encoder, granularity

    def __call__(self, pieces):
        parts, windows, frames = [], 0, 0
        for tokens, covered in pieces:
            pooled = pool_clips(self.encoder, tokens, 1, covered)[self.granularity][0]
            parts.append(pooled * tokens.shape[0] if self.granularity == "utterance" else pooled)
            windows, frames = windows + tokens.shape[0], frames + covered
        array = (sum(parts) / windows if self.granularity == "utterance" else torch.cat(parts)).cpu().numpy()
        return _Result(array, frames)


class _Result:
    """A file's output (features, or window probabilities) and the fbank frames of the file."""

    def __init__(self, value, frames: int):
        self.value, self.frames = value, frames

    @property
    def seconds(self) -> float:
        return self.frames * FRAME_MS / 1000


def _output_names(files: List[str]) -> Dict[str, str]:
    names, used = {}, set()
    for i, path in enumerate(files):
        stem = os.path.splitext(os.path.basename(path))[0] or f"input_{i}"
        name = stem if stem not in used else f"{stem}_{i}"
        used.add(name)
        names[path] = name
    return names


def _quiet(line: str) -> None:
    pass


def extract_files(checkpoint: Union[str, AudioEncoder], inputs: Iterable[str], out: str, granularity: str = "utterance",
                  which: str = "student", batch_size: int = 8, device: Optional[str] = None,
                  progress: bool = True, precision: str = "auto", stream_seconds: float = STREAM_SECONDS,
                  report: Callable[[str], None] = _quiet,
                  max_seconds: float = MAX_FILE_SECONDS) -> Tuple[List[str], List[Tuple[str, str]]]:
    """Features of each input: "utterance" [D] (mean over windows of the CLS token), "frame"
    [R, 8, D] (patch tokens of the rows inside the clip; their centres in ms, 160 r + 80, go to
    ``<stem>.ms.npy`` or the archive key ``<input>.ms``), "all" [W, 1 + P, D] (each window's
    encoder output). ``checkpoint`` is a path (``load_encoder``) or a loaded ``AudioEncoder``.
    ``out`` ending in ``.npz`` gets one archive keyed by input path, else it is a folder with one
    ``<stem>.npy`` per input. The encoder runs on the inference path of ``precision``
    (``inference.py``); files longer than ``stream_seconds`` are streamed, files longer than
    ``max_seconds`` refused (bad files). ``report`` gets the path chosen and the real-time factors.
    Returns (files written, [(bad file, reason)])."""
    device = device or default_device()
    files = expand_inputs(inputs)
    loaded = checkpoint if isinstance(checkpoint, AudioEncoder) else load_encoder(checkpoint, which)
    encoder = for_inference(loaded, device, precision)
    chosen = encoder.path
    report(chosen.describe())
    bad, written, archive = [], [], {}
    names = _output_names(files)
    to_npz = out.endswith(".npz")
    if not to_npz:
        os.makedirs(out, exist_ok=True)
    for path, result in _run(encoder, loaded.input, _within_limit(files, max_seconds, bad), device, batch_size, progress,
                             bad, _Features(encoder, granularity), stream_seconds, report):
        outputs = {"": result.value}
        if granularity == "frame":
            outputs[".ms"] = row_timestamps(result.value.shape[0], encoder.patch_size).numpy()
        for suffix, array in outputs.items():
            if to_npz:
                archive[path + suffix] = array
            else:
                np.save(os.path.join(out, names[path] + suffix + ".npy"), array)
        written.append(path)
    if encoder.path != chosen:  # an automatic bf16 choice fell back to fp32
        report(encoder.path.describe())
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


def _top(probs: torch.Tensor, top_k: int, mids: List[str], names: List[str]) -> List[dict]:
    values, indices = torch.topk(probs, min(top_k, probs.shape[0]))
    return [{"index": int(i), "mid": mids[int(i)], "name": names[int(i)], "probability": round(float(v), 4)}
            for v, i in zip(values, indices)]


def _window_probabilities(pieces) -> _Result:
    probs = [(p, covered) for p, covered in pieces]
    return _Result(torch.cat([p for p, _ in probs]), sum(covered for _, covered in probs))


def tag_files(checkpoint: Union[str, AudioClassifier], files: Iterable[str], top_k: int = 5, batch_size: int = 8,
              device: Optional[str] = None, progress: bool = False, precision: str = "auto",
              windows: bool = False, stream_seconds: float = STREAM_SECONDS,
              report: Callable[[str], None] = _quiet,
              max_seconds: float = MAX_FILE_SECONDS) -> Tuple[List[dict], List[Tuple[str, str]]]:
    """Top-k classes of each file: the probabilities of each window (the sigmoid of the logits, or
    their softmax for a single-label fine-tune), the maximum over windows (an event anywhere in the
    clip counts). ``checkpoint`` is a path (``load_classifier``) or a loaded ``AudioClassifier``.
    Returns ([{"file", "labels": [{"index", "mid", "name", "probability"}]}], [(bad file, reason)]);
    "mid" is the AudioSet id of AudioSet heads, else ""; with ``windows``, each result also has
    "windows": [{"start_s", "end_s", "labels"}], the top-k of each window and its time span.
    ``precision``, ``stream_seconds``, ``report`` and ``max_seconds`` as for ``extract_files``."""
    device = device or default_device()
    classifier = checkpoint if isinstance(checkpoint, AudioClassifier) else load_classifier(checkpoint)
    audioset = classifier.num_classes == 527 and classifier.labels == [c.name for c in audioset_classes()]
    mids = [c.mid for c in audioset_classes()] if audioset else [""] * classifier.num_classes
    model = for_inference(_Probabilities(classifier), device, precision)
    chosen = model.path
    report(chosen.describe())
    bad, results = [], []
    files = _within_limit(expand_inputs(files), max_seconds, bad)
    for path, result in _run(model, classifier.input, files, device, batch_size, progress, bad, _window_probabilities,
                             stream_seconds, report):
        entry = {"file": path, "labels": _top(result.value.max(dim=0).values, top_k, mids, classifier.labels)}
        if windows:
            span = classifier.input.target_length * FRAME_MS / 1000
            entry["windows"] = [{"start_s": round(i * span, 2), "end_s": round(min((i + 1) * span, result.seconds), 2),
                                 "labels": _top(p, top_k, mids, classifier.labels)} for i, p in enumerate(result.value)]
        results.append(entry)
    if model.path != chosen:
        report(model.path.describe())
    return results, bad
