"""Crash-safe checkpoints: atomic files, atomic checkpoint directories, keep-last-N, RNG states.

A training checkpoint is a directory ``step_000001234/`` inside the run directory:

- ``train.pt`` (rank 0): ``format: "sslam-fast/train"``, ``config`` (the full train config, with its
  ``model`` section), ``model`` (``SSLAMPretrainer.state_dict()``: student.*, decoder.* from the
  fp32 master weights, teacher.*), ``step``, ``world_size`` and the run's counters.
- ``rank_<r>.pt`` (every rank): RNG states, the step generator and the data position.
- ``deepspeed/``: the engine's own checkpoint (module, optimizer shards, LR scheduler).

All ranks write into ``.tmp-step_000001234/``; rank 0 renames it once everyone is done, so a
``step_*`` directory is always complete and a crash mid-save leaves only a ``.tmp-*`` that is
ignored and cleaned up by the next run.
"""
import os
import random
import re
import shutil
import tempfile
from typing import Any, Dict, List, Optional

import numpy as np
import torch

TRAIN_FORMAT = "sslam-fast/train"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``: write a temp file in
    the same directory, flush and fsync it, rename it over ``path``, fsync the directory."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


# --------------------------------------------------------------------------- RNG states
def rng_state(generator: torch.Generator) -> Dict[str, Any]:
    """Every random state a step can touch: the step generator, torch (CPU, CUDA), numpy, python."""
    return {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def restore_rng_state(state: Dict[str, Any], generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


# --------------------------------------------------------------------------- run directory
def step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


def list_checkpoints(run_dir: str) -> List[str]:
    """Complete checkpoint directories of ``run_dir``, oldest first."""
    if not os.path.isdir(run_dir):
        return []
    found = []
    for name in os.listdir(run_dir):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(run_dir, name, "train.pt")):
            found.append((int(m.group(1)), os.path.join(run_dir, name)))
    return [path for _, path in sorted(found)]


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
    """Rename a fully written ``tmp_dir`` to its ``step_*`` name, then prune to ``keep_last``."""
    final = os.path.join(run_dir, step_dir_name(step))
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp_dir, final)
    _fsync_dir(run_dir)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def train_checkpoint_file(path: str) -> str:
    """``path`` may name a checkpoint directory or its ``train.pt``."""
    return os.path.join(path, "train.pt") if os.path.isdir(path) else path
