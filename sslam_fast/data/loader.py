"""The sharded, resumable audio loader and robust clip reading (manifests: `manifest.py`).

Loader semantics (`build_loader`):
- Epoch e visits a permutation of the manifest drawn from (seed, e); rank r takes every
  world_size-th entry of it after the tail that does not divide evenly is dropped, so shards are
  disjoint and equally long.
- A file that cannot be read (missing, truncated, not audio, empty, NaN/Inf, shorter than one
  frame, longer than `max_seconds`, not a regular file) is skipped, recorded in `.skipped`, and
  the batch is filled from the next entries. The first LOGGED_SKIPS are logged with their path,
  then a count at most once a minute, so a bad manifest cannot flood the log. When
  `max_skips_in_a_row` entries in a row (or every entry of the rank's epoch, if fewer) yield no
  clip, the loader stops with a NoClipsError naming the manifest and the first failures, instead
  of skipping for ever. A malformed manifest line is a ManifestError.
- `infinite=True` (default): batches run on across epoch boundaries for ever. `infinite=False`:
  one `iter()` is one epoch (the last partial batch dropped when drop_last), the next `iter()`
  is the next epoch.
- `state_dict()` is the (epoch, position) just after the last batch handed out; a loader given
  it with `load_state_dict()` yields the very same following batches.
- Changing the number of ranks mid-epoch (elastic resume): `resharded_state(states, rank, world)`
  turns the states of the old ranks into a count of the epoch's entries consumed by all of them;
  the new ranks deal the rest of the same (seed, epoch) permutation among themselves from there.
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from . import audio
from .manifest import Manifest, ManifestError, load_manifest

logger = logging.getLogger(__name__)
MAX_SECONDS = audio.MAX_SECONDS
MAX_SKIPS_IN_A_ROW = 1000
LOGGED_SKIPS = 20


class NoClipsError(ManifestError):
    """The loader cannot make progress: a run of entries of the manifest gave no clip at all."""


# ----------------------------------------------------------------------------------------------
# Reading one clip
# ----------------------------------------------------------------------------------------------


def read_clip(path: str, max_seconds: float = MAX_SECONDS) -> torch.Tensor:
    """File -> mono 16 kHz float32 [N], mean subtracted (docs/method.md §2.1-2.3).

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
    context.set_forkserver_preload(["sslam_fast.data.loader"])  # torch imported once, in the server
    return context


def epoch_order(num_entries: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1, start: int = 0) -> np.ndarray:
    """Manifest indices rank `rank` visits in epoch `epoch`: a (seed, epoch) permutation from its
    entry `start` on (0 but after an elastic resume), its uneven tail dropped, every
    world_size-th entry from `rank`."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    order = np.random.default_rng([seed, epoch]).permutation(num_entries)
    start = min(start, num_entries)
    usable = start + ((num_entries - start) // world_size) * world_size
    return order[start:usable][rank::world_size]


def consumed_entries(state: dict) -> int:
    """Entries of the epoch ``state["epoch"]`` that all ranks together have consumed, bad ones
    included, when every rank is at ``state["position"]``."""
    start = state.get("start", 0) if state.get("start_epoch", 0) == state["epoch"] else 0
    return start + state["position"] * state["world_size"]


def resharded_state(states: List[dict], rank: int, world_size: int) -> dict:
    """The loader state of rank ``rank`` of ``world_size`` continuing where the ranks whose states
    are ``states`` stopped: the same epoch, the count of entries they consumed as the new start.

    Exact when the old ranks stand at the same position (the usual case: they consume the same
    number of entries per batch); after bad files skipped unevenly, the furthest rank counts, so
    the entries between it and the others are not visited this epoch."""
    epoch, consumed = max((s["epoch"], consumed_entries(s)) for s in states)
    return {"epoch": epoch, "position": 0, "start_epoch": epoch, "start": consumed, "seed": states[0]["seed"],
            "rank": rank, "world_size": world_size}


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
    max_skips_in_a_row: int = MAX_SKIPS_IN_A_ROW
    epoch: int = 0
    position: int = 0
    start_epoch: int = 0  # in epoch start_epoch the shards begin at entry `start` of the permutation
    start: int = 0
    skipped: List[SkippedClip] = field(default_factory=list)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_skips_in_a_row < 1:
            raise ValueError(f"max_skips_in_a_row must be >= 1, got {self.max_skips_in_a_row}")
        self._orders: Dict[int, np.ndarray] = {}
        self._dali = None
        self._counted_at = time.monotonic()

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            start = self.start if epoch == self.start_epoch else 0
            self._orders = {epoch: epoch_order(len(self.manifest), self.seed, epoch, self.rank, self.world_size, start)}
        return self._orders[epoch]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "start_epoch": self.start_epoch, "start": self.start,
                "seed": self.seed, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "rank", "world_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"state_dict {key}={state[key]} but this loader has {key}={getattr(self, key)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.start_epoch, self.start = int(state.get("start_epoch", 0)), int(state.get("start", 0))
        self._orders = {}

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
        if len(self.manifest) < self.world_size:  # every epoch would be empty: the sampler would spin for ever
            raise NoClipsError(f"{self.manifest.source}: {len(self.manifest)} entries for {self.world_size} ranks")
        epoch_at_start = self.epoch
        items, slots = self._items()
        pending: List[Tuple[Tuple[int, int, int, int], torch.Tensor]] = []
        batch = None
        in_a_row = 0
        for tagged, data, reason in items:
            epoch, position, index = tagged[:3]
            if not self.infinite and epoch != epoch_at_start:
                break
            if data is None:
                in_a_row += 1
                self._skip(SkippedClip(index, self.manifest.path(index), reason, epoch), in_a_row)
            else:
                in_a_row = 0
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

    def _skip(self, clip: SkippedClip, in_a_row: int) -> None:
        """Record a skipped entry; log it (the first LOGGED_SKIPS, then a count at most once a minute);
        stop when `max_skips_in_a_row` entries, or a whole epoch of this rank's, gave no clip."""
        self.skipped.append(clip)
        count = len(self.skipped)
        if count <= LOGGED_SKIPS:
            logger.warning("skipping %s (manifest %s entry %d): %s", clip.path, self.manifest.source, clip.index, clip.reason)
        elif time.monotonic() - self._counted_at >= 60:
            self._counted_at = time.monotonic()
            logger.warning("skipped %d unreadable entries of %s so far (loader.skipped lists them)", count, self.manifest.source)
        start = min(self.start, len(self.manifest)) if clip.epoch == self.start_epoch else 0
        if in_a_row >= min(self.max_skips_in_a_row, (len(self.manifest) - start) // self.world_size):
            first = "; ".join(f"{s.path}: {s.reason}" for s in self.skipped[-in_a_row:][:3])
            raise NoClipsError(f"{self.manifest.source}: none of {in_a_row} entries in a row gave a clip (rank {self.rank}), "
                               f"stopping instead of skipping for ever; first: {first}")

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
            from ..mixing import draw_mix_windows, partial_mixture

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
        from .dali import DaliClipReader

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
    max_skips_in_a_row: int = MAX_SKIPS_IN_A_ROW,
) -> AudioLoader:
    """The trainer's data entry point: a manifest (or folder) -> AudioLoader (see module docstring).

    backend: "torch" (fbank in the worker processes on the CPU, or batched on `device`), "dali"
    (decode, resample and spectra in a DALI graph, on the CPU with num_workers threads, or on the GPU
    of `device`; see data_dali), or "auto" (DALI where installed). mixture=True adds the docs/method.md §7 mixture batch, with the windows
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
        max_skips_in_a_row=max_skips_in_a_row,
    )

