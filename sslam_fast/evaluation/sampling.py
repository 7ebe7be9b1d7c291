"""Class-balanced sampling for AudioSet-2M fine-tuning, as EAT and SSLAM do it.

The weight file those recipes read (`task.weights_file`, "weight_train_all.csv") is the one AST's
`egs/audioset/gen_weight_file.py` writes, which EAT/SSLAM take as given:

- count[c] = how many times class c occurs in the label lists of the training set;
- label_weight[c] = 1000 / (count[c] + 0.01);
- the weight of a clip = the sum of label_weight over the labels listed for it (AudioSet is
  multi-label, so a clip with a rare and a common label gets more than either alone).

It is written with numpy's `savetxt` defaults: one weight per line, `%.18e`. EAT's dataset
(`ordered_indices` for `AS2M_finetune`) reads it with `np.loadtxt`, divides by the sum and draws
`num_samples` (200,000) clip indices per epoch with `torch.multinomial(..., replacement=False)`,
the task config not setting `replacement`. `BalancedSampler` does the same draw from a generator
seeded by (seed, epoch), so an epoch's order does not depend on what ran before it.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .. import data as _data

LABEL_WEIGHT_NUMERATOR = 1000.0
LABEL_COUNT_OFFSET = 0.01
AS2M_SAMPLES_PER_EPOCH = 200_000


def _descriptors_beside(lbl_path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(lbl_path)), "label_descriptors.csv")


def balanced_weights(labels: Union[str, os.PathLike, Sequence[Sequence[int]]], num_classes: Optional[int] = None,
                     descriptors: Optional[str] = None) -> np.ndarray:
    """Per-clip sampling weights [clips] (float64) by the original formula (module docstring).

    labels: a `<split>.lbl` file (its labels resolved with `descriptors`, default the
    label_descriptors.csv beside it) or one list of class indices per clip. num_classes: the
    number of classes (default: from the descriptors, or the largest index + 1).
    """
    if isinstance(labels, (str, os.PathLike)):
        table = _data.read_label_descriptors(descriptors or _descriptors_beside(str(labels)))
        lists = _data.read_labels(str(labels), table)
        if num_classes is None:
            num_classes = max(table.values()) + 1
    else:
        lists = [list(clip) for clip in labels]
    flat = np.array([c for clip in lists for c in clip], dtype=np.int64)
    if num_classes is None:
        num_classes = int(flat.max()) + 1 if flat.size else 0
    if flat.size and (flat.min() < 0 or flat.max() >= num_classes):
        raise ValueError(f"class indices must be in [0, {num_classes}), got {int(flat.min())}..{int(flat.max())}")
    count = np.bincount(flat, minlength=num_classes).astype(np.float64)
    label_weight = LABEL_WEIGHT_NUMERATOR / (count + LABEL_COUNT_OFFSET)
    weights = np.zeros(len(lists))
    for i, clip in enumerate(lists):
        for c in clip:
            weights[i] += label_weight[c]
    return weights


def write_weights(lbl_path: str, out_path: str, descriptors: Optional[str] = None) -> np.ndarray:
    """Write the weight file of `lbl_path` in the original layout (one `%.18e` float per line,
    line i for manifest entry i); returns the weights."""
    weights = balanced_weights(lbl_path, descriptors=descriptors)
    np.savetxt(out_path, weights)
    return weights


def read_weights(path: str) -> np.ndarray:
    """A weight file -> [clips] float64 (as EAT reads it)."""
    return np.atleast_1d(np.loadtxt(path, dtype=np.float64))


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)


class BalancedSampler(torch.utils.data.WeightedRandomSampler):
    """`num_samples` clip indices per epoch drawn in proportion to `weights` (EAT's draw: weights
    normalised to sum 1, without replacement by default). Iterating gives epoch `epoch`'s draw,
    the same for the same (weights, seed, epoch); call `set_epoch` before each epoch."""

    def __init__(self, weights: Sequence[float], num_samples: int = AS2M_SAMPLES_PER_EPOCH, replacement: bool = False,
                 seed: int = 0, epoch: int = 0):
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or w.size == 0:
            raise ValueError(f"weights must be a non-empty 1-D sequence, got shape {tuple(w.shape)}")
        if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError("weights must be finite, non-negative and not all zero")
        positive = int((w > 0).sum())
        if not replacement and num_samples > positive:
            raise ValueError(f"num_samples={num_samples} without replacement but only {positive} clips have a positive weight")
        super().__init__(torch.from_numpy(w / w.sum()), num_samples, replacement=replacement)
        self.seed, self.epoch = seed, epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        return super().__iter__()
