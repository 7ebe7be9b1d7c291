"""Fairseq manifests and labels: the layout SSLAM / EAT users already have.

A manifest's first line is the root directory, every other line `relative/path<TAB>n_samples`;
`<split>.lbl` holds one `id<TAB>label,label,...` line per manifest line and
`label_descriptors.csv` holds `index,label,name` rows. A malformed line is a ManifestError that
names the file and the line.
"""

from __future__ import annotations

import csv
import os
import stat
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".mp3")


class ManifestError(ValueError):
    """A manifest, label or descriptor file that does not follow the fairseq layout."""


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
    """Parse a fairseq manifest. Raises ManifestError naming file and line for a malformed line, and
    for anything but a regular file (a FIFO would block, /dev/zero would fill the memory)."""
    with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "r", encoding="utf-8") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ManifestError(f"{path}: not a regular file")
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


def read_class_names(path: str, num_classes: int) -> List[str]:
    """Class i's display name from label_descriptors.csv (its third column, else its label);
    "class i" for indices the file does not list."""
    names = [f"class {i}" for i in range(num_classes)]
    with open(path, "r", encoding="utf-8", newline="") as f:
        for row in csv.reader(f):
            if len(row) >= 2 and row[0].strip().isdigit() and int(row[0]) < num_classes:
                names[int(row[0])] = row[2] if len(row) > 2 and row[2].strip() else row[1]
    return names


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

    if not os.path.isdir(directory):
        raise ManifestError(f"{directory}: no such directory")
    manifest = Manifest(source=out_path, root=os.path.abspath(directory), paths=[], sizes=[])
    bad = []
    for rel in scan_folder(manifest.root, extensions):
        if not os.path.isfile(os.path.join(manifest.root, rel)):  # a FIFO would block the header read
            bad.append((rel, "not a regular file"))
            continue
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
    if not os.path.exists(source):
        raise ManifestError(f"{source}: no such manifest file or folder")
    if os.path.isdir(source):
        paths = scan_folder(source)
        return Manifest(source=source, root=os.path.abspath(source), paths=paths, sizes=[0] * len(paths))
    return read_manifest(source)


def write_task_from_folders(directory: str, out_dir: str, eval_every: int = 4) -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    """A fine-tuning task directory (the fairseq layout ``finetune`` reads) from a folder with one
    subfolder of audio files per class: ``train.tsv`` / ``train.lbl``, ``eval.tsv`` / ``eval.lbl``
    and ``label_descriptors.csv`` (``index,class,class``, classes in sorted order). Every
    ``eval_every``-th file of each class (in sorted order, the first included) goes to eval, the
    rest to train. Returns ({split: entries}, [(unreadable file, reason)])."""
    import soundfile as sf

    root = os.path.abspath(directory)
    classes = sorted(name for name in os.listdir(root) if os.path.isdir(os.path.join(root, name)))
    if not classes:
        raise ManifestError(f"{directory}: no class subfolders (expected {directory}/<class>/<audio files>)")
    splits = {split: (Manifest(source=os.path.join(out_dir, f"{split}.tsv"), root=root, paths=[], sizes=[]), [])
              for split in ("train", "eval")}
    bad = []
    for label in classes:
        if "," in label or any(c.isspace() for c in label):
            raise ManifestError(f"{os.path.join(directory, label)}: class folder names may not hold commas or spaces")
        for i, rel in enumerate(os.path.join(label, name) for name in scan_folder(os.path.join(root, label))):
            try:
                frames = sf.info(os.path.join(root, rel)).frames
            except Exception as err:
                bad.append((rel, str(err)))
                continue
            manifest, labels = splits["eval" if i % eval_every == 0 else "train"]
            manifest.paths.append(rel)
            manifest.sizes.append(frames)
            labels.append(f"{os.path.splitext(rel)[0].replace(os.sep, '_')}\t{label}\n")
    os.makedirs(out_dir, exist_ok=True)
    for split, (manifest, labels) in splits.items():
        if not manifest.paths:
            raise ManifestError(f"{directory}: no readable audio files for the {split} split")
        manifest.write(manifest.source)
        with open(os.path.join(out_dir, f"{split}.lbl"), "w", encoding="utf-8") as f:
            f.writelines(labels)
    with open(os.path.join(out_dir, "label_descriptors.csv"), "w", encoding="utf-8") as f:
        f.writelines(f"{i},{label},{label}\n" for i, label in enumerate(classes))
    return {split: len(manifest) for split, (manifest, _) in splits.items()}, bad
