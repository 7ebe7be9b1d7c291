"""Data: fairseq manifests, robust clip reading, the sharded resumable loader, demo data, norm stats.

Manifest layout (what SSLAM/EAT users already have): the first line is the root directory, every
other line `relative/path<TAB>n_samples`; `<split>.lbl` holds one `id<TAB>label,label,...` line per
manifest line and `label_descriptors.csv` holds `index,label,name` rows.

Loader semantics (`build_loader`):
- Epoch e visits a permutation of the manifest drawn from (seed, e); rank r takes every
  world_size-th entry of it after the tail that does not divide evenly is dropped, so shards are
  disjoint and equally long.
- A file that cannot be read (missing, truncated, not audio, empty, NaN/Inf, shorter than one
  frame, longer than `max_seconds`) is skipped, logged with its path, recorded in `.skipped`, and
  the batch is filled from the next entries. A malformed manifest line is a ManifestError.
- `infinite=True` (default): batches run on across epoch boundaries for ever. `infinite=False`:
  one `iter()` is one epoch (the last partial batch dropped when drop_last), the next `iter()`
  is the next epoch.
- `state_dict()` is the (epoch, position) just after the last batch handed out; a loader given
  it with `load_state_dict()` yields the very same following batches.
"""

from __future__ import annotations

import csv
import ctypes
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import audio

logger = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".mp3")
MAX_SECONDS = 600.0


class ManifestError(ValueError):
    """A manifest, label or descriptor file that does not follow the fairseq layout."""


# ----------------------------------------------------------------------------------------------
# Manifests and labels
# ----------------------------------------------------------------------------------------------


@dataclass
class Manifest:
    """Entries of a fairseq manifest; entry i is manifest line i + 2 (after the root line)."""

    source: str
    root: str
    paths: List[str]
    sizes: List[int]

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, index: int) -> str:
        return os.path.join(self.root, self.paths[index])

    def write(self, out_path: str) -> None:
        """Write the entries in the fairseq layout (what read_manifest reads)."""
        with open(out_path, "w", encoding="utf-8") as f:
            f.write(self.root + "\n")
            f.writelines(f"{path}\t{size}\n" for path, size in zip(self.paths, self.sizes))


def read_manifest(path: str) -> Manifest:
    """Parse a fairseq manifest. Raises ManifestError naming file and line for a malformed line."""
    with open(path, "r", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or not lines[0].strip():
        raise ManifestError(f"{path}:1: first line must be the root directory")
    root = lines[0].strip()
    paths, sizes = [], []
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.rstrip("\r").split("\t")
        if len(fields) != 2 or not fields[0]:
            raise ManifestError(f"{path}:{lineno}: expected 'relative/path<TAB>n_samples', got {line!r}")
        try:
            size = int(fields[1])
        except ValueError:
            raise ManifestError(f"{path}:{lineno}: n_samples {fields[1]!r} is not an integer") from None
        if size < 0:
            raise ManifestError(f"{path}:{lineno}: n_samples {size} is negative")
        paths.append(fields[0])
        sizes.append(size)
    return Manifest(source=path, root=root, paths=paths, sizes=sizes)


def read_label_descriptors(path: str) -> Dict[str, int]:
    """label_descriptors.csv -> {label: class index}; rows are `index,label,display name`."""
    labels: Dict[str, int] = {}
    with open(path, "r", encoding="utf-8", newline="") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 2:
                raise ManifestError(f"{path}:{lineno}: expected 'index,label[,name]', got {row!r}")
            try:
                index = int(row[0])
            except ValueError:
                raise ManifestError(f"{path}:{lineno}: class index {row[0]!r} is not an integer") from None
            if row[1] in labels:
                raise ManifestError(f"{path}:{lineno}: label {row[1]!r} listed twice")
            labels[row[1]] = index
    return labels


def read_labels(label_path: str, descriptors: Dict[str, int], manifest: Optional[Manifest] = None) -> List[List[int]]:
    """`<split>.lbl` -> class indices per manifest entry (line i belongs to manifest entry i)."""
    out: List[List[int]] = []
    with open(label_path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.rstrip("\r\n").split(None, 1)
            if len(fields) != 2:
                raise ManifestError(f"{label_path}:{lineno}: expected 'id<TAB>label,label,...', got {line.rstrip()!r}")
            classes = []
            for label in fields[1].strip().split(","):
                if label not in descriptors:
                    raise ManifestError(f"{label_path}:{lineno}: label {label!r} is not in label_descriptors.csv")
                classes.append(descriptors[label])
            out.append(classes)
    if manifest is not None and len(out) != len(manifest):
        raise ManifestError(f"{label_path}: {len(out)} label lines for {len(manifest)} entries of {manifest.source}")
    return out


def scan_folder(directory: str, extensions: Sequence[str] = AUDIO_EXTENSIONS) -> List[str]:
    """Audio files under `directory` (recursively), as sorted paths relative to it."""
    found = []
    for dirpath, _, files in os.walk(directory):
        for name in files:
            if name.lower().endswith(tuple(extensions)):
                found.append(os.path.relpath(os.path.join(dirpath, name), directory))
    return sorted(found)


def write_manifest(directory: str, out_path: str, extensions: Sequence[str] = AUDIO_EXTENSIONS) -> Tuple[int, List[Tuple[str, str]]]:
    """Scan `directory` and write a fairseq manifest (n_samples at the file's own rate) to out_path.

    Unreadable files are left out and returned as (path, reason). Returns (entries written, left out).
    """
    import soundfile as sf

    manifest = Manifest(source=out_path, root=os.path.abspath(directory), paths=[], sizes=[])
    bad = []
    for rel in scan_folder(manifest.root, extensions):
        try:
            frames = sf.info(os.path.join(manifest.root, rel)).frames
        except Exception as err:
            bad.append((rel, str(err)))
            continue
        if "\t" in rel or "\n" in rel:
            bad.append((rel, "tab or newline in the file name"))
            continue
        manifest.paths.append(rel)
        manifest.sizes.append(frames)
    manifest.write(out_path)
    return len(manifest), bad


def load_manifest(source: str) -> Manifest:
    """A manifest file, or a folder (scanned; sizes unknown are recorded as 0)."""
    if os.path.isdir(source):
        paths = scan_folder(source)
        return Manifest(source=source, root=os.path.abspath(source), paths=paths, sizes=[0] * len(paths))
    return read_manifest(source)


# ----------------------------------------------------------------------------------------------
# Reading one clip
# ----------------------------------------------------------------------------------------------


def read_clip(path: str, max_seconds: float = MAX_SECONDS) -> torch.Tensor:
    """File -> mono 16 kHz float32 [N], mean subtracted (SPEC section 2 steps 1-3).

    Raises audio.AudioError for anything that cannot give at least one fbank frame.
    """
    mono, rate = audio.decode(path, max_seconds=max_seconds)
    wave = audio.resample(torch.from_numpy(mono), rate, audio.SAMPLE_RATE)
    audio.check_length_16k(path, wave.shape[0])
    return wave.sub_(wave.mean(dim=-1, keepdim=True))  # audio.subtract_mean, in place in the clip's own buffer


class ClipDataset(torch.utils.data.Dataset):
    """[(epoch, position, index, slot), ...] -> [(that tag, data or None, the AudioError message or
    None), ...]. Never raises for bad audio, so a worker never dies and the loader can skip and refill.

    features=False: data is the waveform. features=True: the normalised [target_length, 128]
    features are written into `slots[slot]`, a shared-memory ring the loader made before the
    workers started, and data is the slot number. Shipping half a megabyte per clip through the
    worker queue (a fresh shared-memory segment each time, mapped and faulted in on both sides)
    cost more than computing the fbank; a slot's pages are mapped once and reused."""

    def __init__(self, manifest: Manifest, features: bool, target_length: int, norm_mean: float, norm_std: float, max_seconds: float,
                 slots: Optional[torch.Tensor] = None):
        self.manifest = manifest
        self.features = features
        self.target_length = target_length
        self.norm_mean = norm_mean
        self.norm_std = norm_std
        self.max_seconds = max_seconds
        self.slots = slots

    def __len__(self) -> int:
        return len(self.manifest)

    def __getitem__(self, chunk: List[Tuple[int, int, int, int]]):
        """A list of tags -> the list of their results (one worker task for several clips)."""
        return [self._one(tagged) for tagged in chunk]

    def _one(self, tagged: Tuple[int, int, int, int]):
        index = tagged[2]
        try:
            wave = read_clip(self.manifest.path(index), self.max_seconds)
        except audio.AudioError as err:
            return tagged, None, err.reason
        if not self.features:
            return tagged, wave, None
        write_features(audio.kaldi_fbank(wave), self.slots[tagged[3]], self.norm_mean, self.norm_std)
        return tagged, tagged[3], None


def write_features(fbank: torch.Tensor, out: torch.Tensor, norm_mean: float, norm_std: float) -> torch.Tensor:
    """audio.normalise(audio.pad_or_crop(fbank, len(out))) written into `out` [target_length, F]
    without temporaries: the same float32 operations, so the same values."""
    n = min(fbank.shape[0], out.shape[0])
    torch.sub(fbank[:n], norm_mean, out=out[:n]).div_(2.0 * norm_std)
    out[n:].zero_().sub_(norm_mean).div_(2.0 * norm_std)
    return out


# ----------------------------------------------------------------------------------------------
# The loader
# ----------------------------------------------------------------------------------------------


def _worker_init(worker_id: int) -> None:
    """Keep freed memory in the worker's heap. A clip's fbank allocates about 10 MB of temporaries;
    glibc returns them to the OS after each clip (mmap for blocks over ~2 MB, heap trimming for the
    rest), and faulting the fresh zeroed pages back in cost 1-3 ms per clip, as much as the FFT.
    Raising both thresholds (the worker's own process; the trainer's is left alone) makes that
    about 20 page faults per clip instead of 1,100-1,300. DataLoader workers already run one
    intra-op thread each."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's maximum
    libc.mallopt(m_trim_threshold, 128 << 20)


def _worker_start_method():
    """Fork (torch's default) unless DALI is loaded: a process forked while DALI's executor and
    thread pool threads run can crash (seen as worker segfaults after a DALI loader ran in the same
    process), so then workers start from a fork server."""
    if "nvidia.dali" not in sys.modules:
        return None
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["sslam_fast.data"])  # torch imported once, in the server
    return context


def epoch_order(num_entries: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """Manifest indices rank `rank` visits in epoch `epoch`: a (seed, epoch) permutation, its
    uneven tail dropped, every world_size-th entry from `rank`."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    order = np.random.default_rng([seed, epoch]).permutation(num_entries)
    usable = (num_entries // world_size) * world_size
    return order[:usable][rank::world_size]


class _TaggedSampler(torch.utils.data.Sampler):
    """Lists of up to `chunk` consecutive (epoch, position, index, slot) from a start point on:
    through one epoch, or for ever. Slots go round a ring of `num_slots`."""

    def __init__(self, loader: "AudioLoader", epoch: int, position: int, num_slots: int = 1, chunk: int = 1):
        self.loader, self.epoch, self.position, self.num_slots, self.chunk = loader, epoch, position, num_slots, chunk

    def __iter__(self):
        epoch, position, count = self.epoch, self.position, 0
        while True:
            order = self.loader.order(epoch)
            for start in range(position, len(order), self.chunk):
                stop = min(start + self.chunk, len(order))
                yield [(epoch, p, int(order[p]), (count + p - start) % self.num_slots) for p in range(start, stop)]
                count += stop - start
            if not self.loader.infinite:
                return
            epoch, position = epoch + 1, 0


@dataclass
class SkippedClip:
    index: int
    path: str
    reason: str
    epoch: int


@dataclass
class AudioLoader:
    """Iterable of {"fbank": [B, 1, T, 128], "index": [B]} (plus "mixture" and "mix_windows" when
    mixture=True). See the module docstring for sharding, epochs, bad input and resuming."""

    manifest: Manifest
    batch_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    target_length: int = audio.TARGET_LENGTH
    norm_mean: float = audio.NORM_MEAN
    norm_std: float = audio.NORM_STD
    backend: str = "torch"
    num_workers: int = 2
    drop_last: bool = True
    device: Optional[torch.device] = None
    infinite: bool = True
    mixture: bool = False
    mix_windows: Optional[Tuple[int, int]] = None
    max_seconds: float = MAX_SECONDS
    epoch: int = 0
    position: int = 0
    skipped: List[SkippedClip] = field(default_factory=list)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        self._orders: Dict[int, np.ndarray] = {}
        self._dali = None

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(len(self.manifest), self.seed, epoch, self.rank, self.world_size)}
        return self._orders[epoch]

    def batches_per_epoch(self) -> int:
        """Upper bound (bad files lower it): shard length // batch_size."""
        return len(self.order(self.epoch)) // self.batch_size

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "rank", "world_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"state_dict {key}={state[key]} but this loader has {key}={getattr(self, key)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def _features_in_workers(self) -> bool:
        return self.backend == "torch" and (self.device is None or torch.device(self.device).type == "cpu")

    def _chunk(self) -> int:
        """Clips per worker task: a share of a batch, up to 8. Fewer, larger messages through the
        queues cost the main process less than one message per clip."""
        return max(1, min(8, self.batch_size // self.num_workers)) if self.num_workers else 1

    def _prefetch_factor(self) -> int:
        """Tasks queued per worker: together about one batch ahead of the one being assembled."""
        return -(-self.batch_size // (self.num_workers * self._chunk())) + 1

    def _items(self):
        """An iterator of (tag, data or None, reason or None) in sampler order, and the slot ring (or None)."""
        if self.backend == "dali":
            return self._dali_reader().items(tag for tags in _TaggedSampler(self, self.epoch, self.position) for tag in tags), None
        features = self._features_in_workers()
        # The DataLoader hands a new task to a worker only when __next__ returns an earlier one in
        # order, so at most prefetch_factor * num_workers tasks are in flight besides the one just
        # returned (which __iter__ copies out before asking for the next): the clips of that many
        # tasks plus one never share a slot.
        chunk = self._chunk()
        num_slots = (self._prefetch_factor() * self.num_workers + 1) * chunk if self.num_workers else 1
        slots = torch.empty(num_slots, self.target_length, audio.NUM_MEL_BINS).share_memory_() if features else None
        dataset = ClipDataset(self.manifest, features, self.target_length, self.norm_mean, self.norm_std, self.max_seconds, slots)
        sampler = _TaggedSampler(self, self.epoch, self.position, num_slots, chunk)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            sampler=sampler,
            num_workers=self.num_workers,
            prefetch_factor=self._prefetch_factor() if self.num_workers else None,
            persistent_workers=False,
            worker_init_fn=_worker_init if self.num_workers else None,
            multiprocessing_context=_worker_start_method() if self.num_workers else None,
        )
        return (result for results in loader for result in results), slots

    def __iter__(self) -> Iterator[dict]:
        epoch_at_start = self.epoch
        items, slots = self._items()
        pending: List[Tuple[Tuple[int, int, int, int], torch.Tensor]] = []
        batch = None
        for tagged, data, reason in items:
            epoch, position, index = tagged[:3]
            if not self.infinite and epoch != epoch_at_start:
                break
            if data is None:
                path = self.manifest.path(index)
                self.skipped.append(SkippedClip(index, path, reason, epoch))
                logger.warning("skipping %s (manifest %s entry %d): %s", path, self.manifest.source, index, reason)
            else:
                if slots is not None:  # copy out of the ring now: the slot is reused after this
                    if batch is None:
                        batch = torch.empty(self.batch_size, 1, self.target_length, audio.NUM_MEL_BINS)
                    # A plain memcpy through numpy: torch's copy_ would open an OpenMP region, and
                    # the main process's idle OpenMP threads then spin for a core that the workers need.
                    np.copyto(batch[len(pending), 0].numpy(), slots[data].numpy())
                    data = batch[len(pending), 0]
                pending.append((tagged, data))
            if len(pending) == self.batch_size:
                self.epoch, self.position = epoch, position + 1
                yield self._collate(pending, batch)
                pending, batch = [], None
        if not self.infinite:
            if pending and not self.drop_last:
                yield self._collate(pending, batch)
            self.epoch, self.position = epoch_at_start + 1, 0

    def _collate(self, items, features: Optional[torch.Tensor] = None) -> dict:
        index = torch.tensor([tagged[2] for tagged, _ in items], dtype=torch.long)
        datas = [data for _, data in items]
        if features is not None:
            fbank = features[: len(items)]
        elif self.backend == "dali":
            fbank = _stack_rows(datas)[:, None]
        else:
            fbank = self._device_features(datas)[:, None]
        batch = {"fbank": fbank, "index": index}
        if self.mixture:
            from .mixing import draw_mix_windows, partial_mixture

            windows = self.mix_windows
            if windows is None:
                g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.rank, self.epoch, self.position]).generate_state(1)[0]))
                windows = draw_mix_windows(generator=g, num_frames=self.target_length)
            batch["mixture"] = partial_mixture(fbank, windows)
            batch["mix_windows"] = torch.tensor(windows, dtype=torch.long)
        return batch

    def _device_features(self, waves: List[torch.Tensor]) -> torch.Tensor:
        lengths = torch.tensor([w.shape[0] for w in waves])
        padded = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
        device = torch.device(self.device)
        if device.type == "cuda":
            padded = padded.pin_memory().to(device, non_blocking=True)
        fbank = audio.kaldi_fbank(padded, lengths=lengths)
        return audio.normalise(audio.pad_or_crop(fbank, self.target_length), self.norm_mean, self.norm_std)

    def _dali_reader(self):
        from .data_dali import DaliClipReader

        if self._dali is None:
            device = torch.device(self.device) if self.device is not None else torch.device("cpu")
            device_id = (device.index or 0) if device.type == "cuda" else None
            self._dali = DaliClipReader(self, device_id=device_id, num_threads=self.num_workers)
        return self._dali


def _stack_rows(rows: List[torch.Tensor]) -> torch.Tensor:
    """torch.stack(rows), or without a copy the tensor they are consecutive rows of (the usual case
    for the DALI backend, whose features come a whole batch at a time)."""
    first = rows[0]
    step = first.numel()
    storage = first.untyped_storage()
    consecutive = first.is_contiguous() and all(
        r.is_contiguous() and r.shape == first.shape and r.untyped_storage().data_ptr() == storage.data_ptr()
        and r.storage_offset() == first.storage_offset() + i * step for i, r in enumerate(rows))
    if not consecutive:
        return torch.stack(rows)
    return first.new_empty(0).set_(storage, first.storage_offset(), (len(rows), *first.shape))


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def build_loader(
    manifest: str,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    target_length: int = audio.TARGET_LENGTH,
    norm_mean: float = audio.NORM_MEAN,
    norm_std: float = audio.NORM_STD,
    backend: str = "auto",
    num_workers: int = min(4, os.cpu_count() or 1),
    drop_last: bool = True,
    device=None,
    infinite: bool = True,
    mixture: bool = False,
    mix_windows: Optional[Tuple[int, int]] = None,
    max_seconds: float = MAX_SECONDS,
) -> AudioLoader:
    """The trainer's data entry point: a manifest (or folder) -> AudioLoader (see module docstring).

    backend: "torch" (fbank in the worker processes on the CPU, or batched on `device`), "dali"
    (decode, resample and spectra in a DALI graph, on the CPU with num_workers threads, or on the GPU
    of `device`; see data_dali), or "auto" (DALI where installed). mixture=True adds the SPEC section 7 mixture batch, with the windows
    `mix_windows` or drawn per batch from (seed, rank, epoch, position).
    """
    if backend == "auto":
        backend = "dali" if dali_available() else "torch"
    if backend not in ("torch", "dali"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'dali', got {backend!r}")
    return AudioLoader(
        manifest=load_manifest(manifest),
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        target_length=target_length,
        norm_mean=norm_mean,
        norm_std=norm_std,
        backend=backend,
        num_workers=num_workers,
        drop_last=drop_last,
        device=device,
        infinite=infinite,
        mixture=mixture,
        mix_windows=mix_windows,
        max_seconds=max_seconds,
    )


# ----------------------------------------------------------------------------------------------
# Checking a dataset ahead of training
# ----------------------------------------------------------------------------------------------


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
# Normalisation statistics (SPEC section 2 step 6)
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
