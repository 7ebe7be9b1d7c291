"""Clip-level metrics of the AudioSet / ESC-50 literature, in numpy and torch only.

- `average_precision` / `mean_average_precision`: per-class average precision computed as
  scikit-learn's `average_precision_score` does (tied scores form one threshold: one step of the
  precision-recall curve), and their macro average over the classes that have at least one
  positive clip. sklearn gives 0 (with a warning) for a class without positives; EAT/SSLAM average
  with `np.nanmean` over sklearn's values, and the AudioSet papers leave such classes out, so here
  they are excluded from the average (their per-class AP is NaN).
- `accuracy`: top-1 (or top-k) accuracy for single-label tasks (ESC-50, Speech Commands).
- `roc_auc`, `mean_auc`, `d_prime`: per-class ROC AUC (ties count one half, as sklearn's
  `roc_auc_score`), its macro average over the classes with both positives and negatives, and
  d' = sqrt(2) * Phi^-1(AUC). AudioSet papers (AST, PANNs) report d' of the class-averaged AUC,
  `d_prime(mean_auc(scores, targets))`, not the average of per-class d'.
"""

from __future__ import annotations

import math
from typing import Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]


def _as_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _scores_targets(scores: ArrayLike, targets: ArrayLike):
    s, t = _as_numpy(scores), _as_numpy(targets)
    if s.ndim != 2 or s.shape != t.shape:
        raise ValueError(f"scores and targets must both be [clips, classes] of the same shape, got scores {tuple(s.shape)} "
                         f"and targets {tuple(t.shape)}")
    if s.shape[0] == 0:
        raise ValueError(f"no clips: scores {tuple(s.shape)}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or Inf")
    if not np.isin(t, (0.0, 1.0)).all():
        raise ValueError("targets must be 0/1 (multi-hot)")
    return s, t


def average_precision(scores: ArrayLike, targets: ArrayLike) -> np.ndarray:
    """Per-class average precision [classes] (float64); NaN for a class with no positive clip.

    scores, targets: [clips, classes]; targets are 0/1. For each class, with thresholds at the
    distinct scores in decreasing order, AP = sum_k (R_k - R_{k-1}) * P_k, exactly the value of
    sklearn.metrics.average_precision_score(targets[:, c], scores[:, c]).
    """
    s, t = _scores_targets(scores, targets)
    n = s.shape[0]
    out = np.full(s.shape[1], np.nan)
    for c in range(s.shape[1]):
        order = np.argsort(-s[:, c], kind="mergesort")
        sorted_scores, sorted_targets = s[order, c], t[order, c]
        positives = sorted_targets.sum()
        if positives == 0:
            continue
        ends = np.r_[np.flatnonzero(np.diff(sorted_scores)), n - 1]  # last index of each tied group
        tps = np.cumsum(sorted_targets)[ends]
        precision = tps / (ends + 1)
        recall_steps = np.diff(np.r_[0.0, tps]) / positives
        out[c] = float(np.sum(recall_steps * precision))
    return out


def mean_average_precision(scores: ArrayLike, targets: ArrayLike) -> float:
    """mAP: the mean of `average_precision` over the classes with at least one positive clip
    (classes with none are excluded). Raises ValueError when no class has a positive."""
    ap = average_precision(scores, targets)
    if np.isnan(ap).all():
        raise ValueError(f"no class of targets {tuple(np.shape(targets))} has a positive clip")
    return float(np.nanmean(ap))


def accuracy(scores: ArrayLike, labels: ArrayLike, top_k: int = 1) -> float:
    """Fraction of clips whose label is among the `top_k` highest scores.

    scores: [clips, classes] scores, logits or probabilities. labels: [clips] class indices, or
    [clips, classes] one-hot targets (the class is their argmax, as EAT's evaluation takes it).
    Ties rank the lower class index first, so top_k=1 is `argmax(scores) == label` with numpy's argmax.
    """
    s = _as_numpy(scores)
    y = _as_numpy(labels)
    if s.ndim != 2:
        raise ValueError(f"scores must be [clips, classes], got shape {tuple(s.shape)}")
    if y.ndim == 2:
        if y.shape != s.shape:
            raise ValueError(f"one-hot labels {tuple(y.shape)} do not match scores {tuple(s.shape)}")
        y = y.argmax(axis=1)
    if y.ndim != 1 or y.shape[0] != s.shape[0]:
        raise ValueError(f"labels must be [clips] or [clips, classes] for scores {tuple(s.shape)}, got shape {tuple(y.shape)}")
    if s.shape[0] == 0:
        raise ValueError(f"no clips: scores {tuple(s.shape)}")
    if not 1 <= top_k <= s.shape[1]:
        raise ValueError(f"top_k must be in [1, {s.shape[1]}], got {top_k}")
    if (y != np.round(y)).any() or y.min() < 0 or y.max() >= s.shape[1]:
        raise ValueError(f"labels must be class indices in [0, {s.shape[1]})")
    y = y.astype(np.int64)
    own = s[np.arange(len(y)), y][:, None]
    lower_index = np.arange(s.shape[1])[None, :] < y[:, None]
    ranked_above = (s > own) | ((s == own) & lower_index)
    return float(np.mean(ranked_above.sum(axis=1) < top_k))


def roc_auc(scores: ArrayLike, targets: ArrayLike) -> np.ndarray:
    """Per-class ROC AUC [classes] (float64), sklearn's roc_auc_score per column: the probability
    that a positive clip scores above a negative one, ties counting one half. NaN for a class
    without positives or without negatives (undefined there)."""
    s, t = _scores_targets(scores, targets)
    out = np.full(s.shape[1], np.nan)
    for c in range(s.shape[1]):
        positives = int(t[:, c].sum())
        negatives = s.shape[0] - positives
        if positives == 0 or negatives == 0:
            continue
        ranks = _average_ranks(s[:, c])
        out[c] = (ranks[t[:, c] == 1].sum() - positives * (positives + 1) / 2.0) / (positives * negatives)
    return out


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_x)) + 1]
    stops = np.r_[starts[1:], len(x)]
    group_rank = (starts + 1 + stops) / 2.0
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(group_rank, stops - starts)
    return ranks


def mean_auc(scores: ArrayLike, targets: ArrayLike) -> float:
    """Mean of `roc_auc` over the classes with both positive and negative clips."""
    auc = roc_auc(scores, targets)
    if np.isnan(auc).all():
        raise ValueError(f"no class of targets {tuple(np.shape(targets))} has both positive and negative clips")
    return float(np.nanmean(auc))


def d_prime(auc: Union[float, ArrayLike]):
    """d' = sqrt(2) * Phi^-1(auc), Phi the standard normal CDF (a float for a float, else an array).
    AudioSet results quote d_prime(mean_auc(...))."""
    value = math.sqrt(2.0) * torch.special.ndtri(torch.as_tensor(_as_numpy(auc)))
    return float(value) if value.ndim == 0 else value.numpy()
