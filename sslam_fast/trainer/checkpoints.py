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

All ranks write into ``.tmp-step_000001234/``; once everyone is done rank 0 hashes every file,
writes ``checksums.json`` and renames the directory, so a ``step_*`` directory is complete and a
crash mid-save leaves only a ``.tmp-*`` that is ignored and cleaned up by the next run. On resume
the newest checkpoint is verified against its checksums (and loaded); one that fails is reported,
renamed to ``step_*.rejected`` (never deleted) and the previous one is tried.
"""
import hashlib
import json
import os
import random
import re
import shutil
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..serialization import CheckpointError, fsync_dir, safe_load, vet_pickle_file

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


def read_resume_state(path: str, rank: int, world_size: Optional[int] = None, zero_stage: Optional[int] = None,
                      precision: Optional[str] = None, fmt: str = TRAIN_FORMAT) -> Dict[str, Any]:
    """The safe reads of a resume, all through ``safe_load`` (weights only): ``train.pt``, then
    either ``rank_<rank>.pt`` and every file of ``deepspeed/`` vetted before DeepSpeed loads them
    (same layout), or ``optimizer.pt``, the consolidated optimizer state (elastic resume: another
    world size, ZeRO stage or precision; ``rank_<rank>.pt`` too when it exists). ``fmt`` is the
    ``format`` that ``train.pt`` must name (the fine-tuning trainer passes its own)."""
    state = safe_load(os.path.join(path, "train.pt"))
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise CheckpointError(f"{os.path.join(path, 'train.pt')}: not a training checkpoint of this project")
    own_file = os.path.join(path, f"rank_{rank}.pt")
    if is_elastic(state, world_size, zero_stage, precision):
        optimizer = os.path.join(path, OPTIMIZER_FILE)
        if not os.path.isfile(optimizer):
            raise CheckpointError(f"{optimizer}: missing; checkpoints written before elastic resume existed resume "
                                  f"only with the processes, ZeRO stage and precision they were written with")
        own = safe_load(own_file) if state.get("world_size") == world_size else None
        return {"train": state, "rank": own, "optimizer": safe_load(optimizer), "elastic": True}
    own = safe_load(own_file)
    engine_dir = os.path.join(path, "deepspeed")
    for root, _, files in os.walk(engine_dir):
        for name in sorted(files):
            if name.endswith(".pt"):
                vet_pickle_file(os.path.join(root, name), DEEPSPEED_GLOBALS)
    return {"train": state, "rank": own, "optimizer": None, "elastic": False}


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
def sha256_file(path: str, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_files(directory: str) -> List[str]:
    """Every file under ``directory`` but the checksums, as sorted relative paths."""
    found = []
    for root, _, files in os.walk(directory):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel != CHECKSUMS:
                found.append(rel)
    return sorted(found)


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
    """None when every file listed in ``checksums.json`` is there with its size (and, with
    ``hashes``, its SHA-256); otherwise the first problem, naming the file."""
    path = os.path.join(directory, CHECKSUMS)
    try:
        with open(path, encoding="utf-8") as f:
            listed = json.load(f)["files"]
    except FileNotFoundError:
        return f"{path}: missing (the checkpoint was never published)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{path}: unreadable ({e})"
    for rel, want in sorted(listed.items()):
        file = os.path.join(directory, rel)
        if not os.path.isfile(file):
            return f"{file}: missing"
        size = os.path.getsize(file)
        if size != want["size"]:
            return f"{file}: {size} bytes, {want['size']} when it was saved"
        if hashes and sha256_file(file) != want["sha256"]:
            return f"{file}: SHA-256 differs from the one recorded when it was saved"
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


def train_checkpoint_file(path: str) -> str:
    """``path`` may name a checkpoint directory or its ``train.pt``."""
    return os.path.join(path, "train.pt") if os.path.isdir(path) else path
