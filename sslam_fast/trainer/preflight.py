"""What a run checks before it writes anything: its data files and its checkpoint directory.

Each problem is a ``ConfigError`` whose message names the key and the file; the trainer gathers
them from every rank, raises the first on all of them, and only rank 0 prints it.
"""
import os
import tempfile
from typing import Optional

from ..config import ConfigError
from ..data.manifest import ManifestError, load_manifest
from .config import TrainConfig


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


def problem(cfg: TrainConfig) -> Optional[str]:
    """The first problem of this rank's inputs, or None."""
    try:
        check_data(cfg)
        check_writable(cfg.checkpoint.dir)
    except ConfigError as e:
        return str(e)
    return None
