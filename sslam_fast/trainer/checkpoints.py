"""Crash-safe checkpoints: atomic files, atomic checkpoint directories, keep-last-N, RNG states.

A training checkpoint is a directory ``step_000001234/`` inside the run directory:

- ``train.pt`` (rank 0): ``format: "sslam-fast/train"``, ``config`` (the full train config, with its
  ``model`` section), ``model`` (``SSLAMPretrainer.state_dict()``: student.*, decoder.* from the
  fp32 master weights, teacher.*), ``step``, ``world_size`` and the run's counters.
- ``rank_<r>.pt`` (every rank): RNG states, the step generator and the data position.
- ``deepspeed/``: the engine's own checkpoint (module, optimizer shards, LR scheduler); what a
  resume with the same processes, ZeRO stage and precision loads (exact).
- ``optimizer.pt`` (rank 0): the whole fp32 optimizer state per parameter (master weights,
  exp_avg, exp_avg_sq, step) and the LR scheduler state, plain tensors: what an elastic resume
  (another number of processes, ZeRO stage or precision) loads into its own partitioning.
- ``checksums.json``: the size and SHA-256 of every other file, written last (the publish step).

A checkpoint directory holds regular files and directories only: a symbolic link, FIFO, socket or
device anywhere under it, a file that ``checksums.json`` does not list, or a ``checksums.json`` that
is not a mapping of relative paths inside the directory to sizes and digests rejects it. On resume
each file is read once into memory, checked against its size and digest and loaded from those
same bytes (DeepSpeed's engine files too, through ``load_engine_state``), so that nothing swapped
in between the check and the load is ever read.

All ranks write into ``.tmp-step_000001234/``; once everyone is done rank 0 hashes every file,
writes ``checksums.json`` and renames the directory, so a ``step_*`` directory is complete and a
crash mid-save leaves only a ``.tmp-*`` that is ignored and cleaned up by the next run. On resume
the newest checkpoint is verified against its checksums (and loaded); one that fails is reported,
renamed to ``step_*.rejected`` (never deleted) and the previous one is tried.
"""
import hashlib
import importlib
import json
import os
import random
import re
import shutil
import stat
from contextlib import contextmanager
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from ..serialization import CheckpointError, fsync_dir, load_bytes

TRAIN_FORMAT = "sslam-fast/train"
OPTIMIZER_FILE = "optimizer.pt"
CHECKSUMS = "checksums.json"
REJECTED_SUFFIX = ".rejected"
_STEP_DIR = re.compile(r"^step_(\d+)$")


# --------------------------------------------------------------------------- RNG states
def rng_state(generator: torch.Generator) -> Dict[str, Any]:
    """Every random state a step can touch: the step generator, torch (CPU, CUDA), numpy, python.

    Stored as tensors and plain numbers only, so that the file loads with ``weights_only=True``.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, python_gauss = random.getstate()
    return {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": python_gauss},
    }


def restore_rng_state(state: Dict[str, Any], generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"].tolist()), p["gauss"]))


# The objects DeepSpeed pickles into its engine checkpoint (its loader reads them with full pickle).
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def is_elastic(state: Dict[str, Any], world_size: Optional[int], zero_stage: Optional[int],
               precision: Optional[str]) -> bool:
    """Whether a resume from ``state`` (``train.pt``) changes the number of processes, the ZeRO
    stage or the precision, so that DeepSpeed's per-rank partitioned files do not fit."""
    saved = (state.get("world_size"), state.get("zero_stage", zero_stage), state["config"]["train"]["precision"])
    return world_size is not None and saved != (world_size, zero_stage, precision or saved[2])


@contextmanager
def malformed_is_checkpoint_error(path: str):
    """A missing key or a value of the wrong type met while reading a checkpoint's content becomes
    a ``CheckpointError`` naming it (the files' digests say only that they were not changed)."""
    try:
        yield
    except (KeyError, TypeError, AttributeError, IndexError) as exc:
        raise CheckpointError(f"{path}: malformed checkpoint ({type(exc).__name__}: {exc})") from exc


def deepspeed_classes() -> Dict[str, type]:
    """``DEEPSPEED_GLOBALS`` resolved: the classes an engine file may hold, made for real."""
    found = {}
    for qualified in DEEPSPEED_GLOBALS:
        module, name = qualified.rsplit(".", 1)
        found[qualified] = getattr(importlib.import_module(module), name)
    return found


def read_resume_state(path: str, rank: int, world_size: Optional[int] = None, zero_stage: Optional[int] = None,
                      precision: Optional[str] = None, fmt: str = TRAIN_FORMAT) -> Dict[str, Any]:
    """The safe reads of a resume: the directory's layout and ``checksums.json`` checked, then
    ``train.pt``, and either ``rank_<rank>.pt`` and every file of ``deepspeed/`` (read once here to
    refuse a bad one before DeepSpeed starts, and again, checked, when ``load_engine_state`` hands
    it to DeepSpeed), or ``optimizer.pt``, the consolidated optimizer state (elastic resume: another
    world size, ZeRO stage or precision; ``rank_<rank>.pt`` too when it exists). Each file is read
    once, checked against its size and digest and loaded from those bytes. ``fmt`` is the
    ``format`` that ``train.pt`` must name (the fine-tuning trainer passes its own)."""
    listing = checked_listing(path)

    def load(rel: str, **kwargs):
        return load_bytes(read_checked(path, rel, listing), os.path.join(path, rel), **kwargs)

    state = load("train.pt")
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise CheckpointError(f"{os.path.join(path, 'train.pt')}: not a training checkpoint of this project")
    own_file = f"rank_{rank}.pt"
    with malformed_is_checkpoint_error(os.path.join(path, "train.pt")):
        elastic = is_elastic(state, world_size, zero_stage, precision)
    if elastic:
        if OPTIMIZER_FILE not in listing:
            raise CheckpointError(f"{os.path.join(path, OPTIMIZER_FILE)}: missing; checkpoints written before elastic "
                                  f"resume existed resume only with the processes, ZeRO stage and precision they "
                                  f"were written with")
        own = load(own_file) if state.get("world_size") == world_size else None
        return {"train": state, "rank": own, "optimizer": load(OPTIMIZER_FILE), "elastic": True, "listing": listing}
    own = load(own_file)
    for rel in sorted(listing):
        if rel.startswith("deepspeed/") and rel.endswith(".pt"):
            load(rel, map_location="meta", real=deepspeed_classes())
    return {"train": state, "rank": own, "optimizer": None, "elastic": False, "listing": listing}


class _CheckedEngineFiles:
    """DeepSpeed's checkpoint engine with ``load`` replaced: a file of the checkpoint, read once,
    checked against ``checksums.json`` and unpickled by the bounded unpickler from those bytes."""

    def __init__(self, engine_files, directory: str, listing: Dict[str, Tuple[int, str]]):
        self._engine_files, self._directory, self._listing = engine_files, directory, listing

    def load(self, path: str, map_location=None):
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(self._directory)).replace(os.sep, "/")
        if rel not in self._listing:
            raise CheckpointError(f"{path}: DeepSpeed asks for a file that {os.path.join(self._directory, CHECKSUMS)} "
                                  "does not list")
        return load_bytes(read_checked(self._directory, rel, self._listing), path, map_location, real=deepspeed_classes())

    def __getattr__(self, name):
        return getattr(self._engine_files, name)


def load_engine_state(engine, path: str, listing: Dict[str, Tuple[int, str]]) -> None:
    """``engine.load_checkpoint`` of the checkpoint ``path``, every file DeepSpeed opens read through
    ``read_checked`` (DeepSpeed's own reader would unpickle whatever is there by then)."""
    engine_files = engine.checkpoint_engine
    engine.checkpoint_engine = _CheckedEngineFiles(engine_files, path, listing)
    try:
        engine.load_checkpoint(os.path.join(path, "deepspeed"), tag="engine",
                               load_optimizer_states=True, load_lr_scheduler_states=True)
    finally:
        engine.checkpoint_engine = engine_files


# --------------------------------------------------------------------------- run directory
def step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


def list_checkpoints(run_dir: str) -> List[str]:
    """Published checkpoint directories of ``run_dir`` (``step_*``, verified or not), oldest first."""
    if not os.path.isdir(run_dir):
        return []
    found = []
    for name in os.listdir(run_dir):
        m = _STEP_DIR.match(name)
        if m and os.path.isdir(os.path.join(run_dir, name)):
            found.append((int(m.group(1)), os.path.join(run_dir, name)))
    return [path for _, path in sorted(found)]


# --------------------------------------------------------------------------- checksums
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_KINDS = ((stat.S_ISLNK, "symbolic link"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
          (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"))


def _not_regular(path: str, mode: int) -> CheckpointError:
    kind = next((name for test, name in _KINDS if test(mode)), "special file")
    return CheckpointError(f"{path}: a {kind}; a checkpoint holds only regular files and directories")


def checkpoint_files(directory: str) -> List[str]:
    """Every file under ``directory`` but the checksums, as sorted relative paths ('/'-separated).

    Nothing is followed (lstat): a symbolic link, FIFO, socket or device anywhere under it, or the
    directory itself being a link, raises ``CheckpointError``.
    """
    mode = os.lstat(directory).st_mode
    if not stat.S_ISDIR(mode):
        raise _not_regular(directory, mode)
    found, todo = [], [""]
    while todo:
        sub = todo.pop()
        with os.scandir(os.path.join(directory, sub)) as entries:
            for entry in entries:
                rel = f"{sub}/{entry.name}" if sub else entry.name
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    todo.append(rel)
                elif stat.S_ISREG(mode):
                    if rel != CHECKSUMS:
                        found.append(rel)
                else:
                    raise _not_regular(os.path.join(directory, rel), mode)
    return sorted(found)


def _open_beneath(directory: str, rel: str) -> int:
    """A read-only descriptor of ``directory/rel``, no component followed if it is a link, a FIFO
    opened without blocking; the caller checks that it is a regular file."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        *parents, name = rel.split("/")
        for part in parents:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = inner
        return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    finally:
        os.close(fd)


def _read_beneath(directory: str, rel: str) -> bytes:
    path = os.path.join(directory, rel)
    try:
        fd = _open_beneath(directory, rel)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be opened as a regular file of the checkpoint ({exc.strerror})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode)
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    finally:
        os.close(fd)


def read_checksums(directory: str) -> Dict[str, Tuple[int, str]]:
    """``checksums.json`` as {relative path: (size, sha256)}, validated before anything it names is
    opened: a mapping ``{"hash": "sha256", "files": {path: {"size": int, "sha256": hex}}}`` whose
    paths are normalised, relative and inside the directory. Anything else: ``CheckpointError``."""
    path = os.path.join(directory, CHECKSUMS)
    try:
        data = json.loads(_read_beneath(directory, CHECKSUMS).decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict) or data.get("hash") != "sha256" or not isinstance(data.get("files"), dict):
        raise CheckpointError(f"{path}: not a mapping with hash 'sha256' and a mapping 'files'")
    listing = {}
    for rel, entry in data["files"].items():
        if (not rel or rel.startswith("/") or "\\" in rel or "\0" in rel or rel == CHECKSUMS
                or any(part in ("", ".", "..") for part in rel.split("/"))):
            raise CheckpointError(f"{path}: {rel!r:.200} is not a relative path inside the checkpoint")
        if not (isinstance(entry, dict) and set(entry) == {"size", "sha256"} and type(entry["size"]) is int
                and entry["size"] >= 0 and isinstance(entry["sha256"], str) and _SHA256.match(entry["sha256"])):
            raise CheckpointError(f"{path}: the entry of {rel!r:.200} is not {{'size': int, 'sha256': 64 hex digits}}")
        listing[rel] = (entry["size"], entry["sha256"])
    return listing


def checked_listing(directory: str) -> Dict[str, Tuple[int, str]]:
    """The validated ``checksums.json`` of ``directory`` once its layout is checked: regular files
    only, each one listed and each listed one there with its size (digests: ``read_checked``)."""
    if not os.path.lexists(os.path.join(directory, CHECKSUMS)):
        raise CheckpointError(f"{os.path.join(directory, CHECKSUMS)}: missing (the checkpoint was never published)")
    present = checkpoint_files(directory)
    listing = read_checksums(directory)
    for rel in present:
        if rel not in listing:
            raise CheckpointError(f"{os.path.join(directory, rel)}: not listed in {CHECKSUMS}")
    for rel, (size, _) in sorted(listing.items()):
        file = os.path.join(directory, rel)
        if rel not in present:
            raise CheckpointError(f"{file}: missing")
        actual = os.lstat(file).st_size
        if actual != size:
            raise CheckpointError(f"{file}: {actual} bytes, {size} when it was saved")
    return listing


def read_checked(directory: str, rel: str, listing: Dict[str, Tuple[int, str]]) -> bytes:
    """The bytes of ``directory/rel`` (read once, nothing followed), refused unless they have the
    size and SHA-256 that ``listing`` records: what the caller then loads is what was checked."""
    path = os.path.join(directory, rel)
    if rel not in listing:
        raise CheckpointError(f"{path}: not listed in {CHECKSUMS}")
    data = _read_beneath(directory, rel)
    size, digest = listing[rel]
    if len(data) != size:
        raise CheckpointError(f"{path}: {len(data)} bytes, {size} when it was saved")
    if hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(f"{path}: SHA-256 differs from the one recorded when it was saved")
    return data


def sha256_file(path: str, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(directory: str) -> None:
    """Hash every file of ``directory`` and write ``checksums.json`` (atomically, last)."""
    files = {rel: {"size": os.path.getsize(os.path.join(directory, rel)),
                   "sha256": sha256_file(os.path.join(directory, rel))} for rel in checkpoint_files(directory)}
    path = os.path.join(directory, CHECKSUMS)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"hash": "sha256", "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    fsync_dir(directory)


def verify_checkpoint(directory: str, hashes: bool = True) -> Optional[str]:
    """None when ``directory`` holds regular files only, each listed in a well-formed
    ``checksums.json`` with its size (and, with ``hashes``, its SHA-256); otherwise the first
    problem, naming the file."""
    try:
        listing = checked_listing(directory)
        if hashes:
            for rel in sorted(listing):
                fd = _open_beneath(directory, rel)
                with os.fdopen(fd, "rb") as f:
                    digest = hashlib.sha256()
                    for block in iter(lambda: f.read(8 << 20), b""):
                        digest.update(block)
                if digest.hexdigest() != listing[rel][1]:
                    return f"{os.path.join(directory, rel)}: SHA-256 differs from the one recorded when it was saved"
    except CheckpointError as e:
        return str(e)
    except OSError as e:
        return f"{e.filename or directory}: {e.strerror}"
    return None


def reject(directory: str) -> str:
    """Move a checkpoint that failed verification or loading out of the way; never deletes it."""
    target, n = directory + REJECTED_SUFFIX, 1
    while os.path.exists(target):
        n += 1
        target = f"{directory}{REJECTED_SUFFIX}.{n}"
    os.replace(directory, target)
    return target


def latest_checkpoint(run_dir: str) -> Optional[str]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def temp_dir_for(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "." + "tmp-" + step_dir_name(step))


def remove_stale_temps(run_dir: str) -> List[str]:
    """Delete ``.tmp-step_*`` left by a save that was interrupted; returns what was removed."""
    removed = []
    if os.path.isdir(run_dir):
        for name in os.listdir(run_dir):
            if name.startswith(".tmp-step_"):
                shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
                removed.append(name)
    return removed


def publish(tmp_dir: str, run_dir: str, step: int, keep_last: int) -> str:
    """Write the checksums of a fully written ``tmp_dir``, rename it to its ``step_*`` name, then
    prune to ``keep_last`` good checkpoints."""
    write_checksums(tmp_dir)
    final = os.path.join(run_dir, step_dir_name(step))
    if os.path.exists(final):
        reject(final)
    os.replace(tmp_dir, final)
    fsync_dir(run_dir)
    prune(run_dir, keep_last)
    return final


def begin_save(run_dir: str, step: int, is_main: bool) -> str:
    """(Collective.) The temp directory that every rank writes checkpoint ``step`` into; rank 0
    makes it (after removing what an interrupted save left)."""
    tmp = temp_dir_for(run_dir, step)
    if is_main:
        remove_stale_temps(run_dir)
        os.makedirs(tmp)
    dist.barrier()
    return tmp


def finish_save(tmp_dir: str, run_dir: str, step: int, keep_last: int, is_main: bool) -> str:
    """(Collective.) Once every rank has written into ``tmp_dir``: flush to disk, rank 0 publishes
    it (checksums, rename, prune); returns the published path."""
    os.sync()  # DeepSpeed's own files are on disk before the directory is published
    dist.barrier()
    if is_main:
        publish(tmp_dir, run_dir, step, keep_last)
    dist.barrier()
    return os.path.join(run_dir, step_dir_name(step))


def prune(run_dir: str, keep_last: int) -> List[str]:
    """Delete the good checkpoints older than the newest ``keep_last`` good ones; returns them.

    "Good" here is the quick check (every listed file there with its size). A checkpoint that
    fails it is neither counted nor deleted, so bad newer checkpoints never cost the good ones.
    """
    removed, good = [], 0
    for path in reversed(list_checkpoints(run_dir)):
        if verify_checkpoint(path, hashes=False) is not None:
            continue
        good += 1
        if good > keep_last:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
