"""What a run checks before it writes anything or joins its peers: the batch split over the
processes, the device, its data files and its checkpoint directory.

Each problem is a ``ConfigError`` whose message names the key and the file. Every rank runs these
checks on its own, from the launch environment and the files it sees, before the process group's
rendezvous: so every rank reaches the same verdict and exits with the same status, and no rank's
exit can break a peer's rendezvous into a traceback (launch.py prints the error on rank 0 only).
"""
import os
import tempfile
from typing import Optional, Tuple

import torch

from ..config import ConfigError
from ..data.manifest import ManifestError, load_manifest
from .checkpoints import latest_checkpoint
from .config import TrainConfig
from .optim import plan_batch


def launch_rank_and_world() -> Tuple[int, int]:
    """This process's rank and the number of processes, as the launcher (deepspeed, torchrun) set
    them in the environment; one process when started plainly."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def check_data(cfg: TrainConfig) -> None:
    """The manifest exists, parses, has entries, its root exists, and a ``<stem>.lbl`` beside it
    (the fairseq layout) has one line per entry. Nothing to check for ``data.demo_clips``."""
    path = cfg.data.manifest
    if not path:
        return
    if not os.path.exists(path):
        raise ConfigError(f"data.manifest={path}: no such file or directory")
    try:
        manifest = load_manifest(path)
    except ManifestError as e:
        raise ConfigError(f"data.manifest: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"data.manifest={path}: cannot be read ({e})") from None
    if not os.path.isdir(manifest.root):
        raise ConfigError(f"data.manifest={path}: its root directory {manifest.root!r} (line 1) does not exist")
    if len(manifest) == 0:
        raise ConfigError(f"data.manifest={path}: no entries (an empty manifest, or a folder without audio files)")
    labels = os.path.splitext(path)[0] + ".lbl"
    if os.path.isfile(path) and os.path.isfile(labels):
        with open(labels, encoding="utf-8") as f:
            count = sum(1 for line in f if line.strip())
        if count != len(manifest):
            raise ConfigError(f"{labels}: {count} label lines for the {len(manifest)} entries of data.manifest={path}: "
                              "the labels do not line up with the manifest")


def check_writable(directory: str) -> None:
    """``checkpoint.dir`` can be created and written (a probe file is made and removed)."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise ConfigError(f"checkpoint.dir={directory} is not writable ({e.strerror or e})") from None


def emulated_bf16_warning(dtype: str, cuda: bool) -> Optional[str]:
    """What to tell a CPU run in bf16 on a CPU that computes bf16 only by emulation (no AVX512-BF16
    / AMX: oneDNN converts every product, slower than fp32); None when there is nothing to say."""
    from ..released.inference import cpu_info, native_bf16

    if dtype != "bf16" or cuda or native_bf16():
        return None
    return (f"train.precision: bf16 autocast on {cpu_info().model}, which has no native bf16 (AVX512-BF16 / AMX): "
            "oneDNN emulates it, slower than fp32; set train.precision=fp32 for speed here")


def check_launch(cfg: TrainConfig, world_size: int) -> None:
    """Everything a pretraining run can check before the rendezvous; raises the first problem."""
    plan_batch(cfg.train.global_batch, world_size, cfg.train.max_micro_batch)
    cuda = torch.cuda.is_available()
    if cfg.train.cuda_graph and not cuda:
        raise ConfigError("train.cuda_graph: CUDA graphs need a CUDA device; this run is on the CPU")
    if cfg.train.dtype == "fp16" and not cuda:
        raise ConfigError("train.precision: the original execution's fp16 needs a CUDA device (DeepSpeed runs no "
                          "fp16 on a CPU); set train.precision=fp32 to run its model side here")
    check_data(cfg)
    check_writable(cfg.checkpoint.dir)
    if not cfg.checkpoint.resume and latest_checkpoint(cfg.checkpoint.dir):
        raise ConfigError(f"checkpoint.dir={cfg.checkpoint.dir} holds checkpoints and checkpoint.resume is false")
