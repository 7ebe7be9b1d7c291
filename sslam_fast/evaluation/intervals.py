"""Bootstrap confidence intervals for probe scores, over test clips and seeds.

A replicate draws the seeds with replacement and, independently, the test clips with replacement
(the same clips for every seed and every model: the test set is shared), and averages the metric
of each drawn seed's predictions on the drawn clips. The interval is the percentile interval of
the replicates. Every model is scored on the same draws, so the interval of a difference between
two models is that of the per-replicate differences (a paired bootstrap); a difference is
"resolved" when its interval excludes zero.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Sequence

import numpy as np

Metric = Callable[[np.ndarray, np.ndarray], float]


@dataclass(frozen=True)
class Interval:
    mean: float  # the metric averaged over the seeds, on every test clip
    low: float
    high: float

    def excludes(self, value: float) -> bool:
        return not self.low <= value <= self.high


def bootstrap_replicates(metric: Metric, predictions: Dict[str, Sequence[np.ndarray]], targets: np.ndarray,
                         replicates: int = 2000, seed: int = 0) -> Dict[str, np.ndarray]:
    """name -> [replicates] metric values. predictions: name -> per seed, [clips, classes] scores
    (every model with the same number of seeds); targets: [clips, ...], shared by all seeds."""
    seeds = {len(p) for p in predictions.values()}
    if len(seeds) != 1 or 0 in seeds:
        raise ValueError(f"every model needs the same, non-zero number of seeds, got {sorted(seeds)}")
    n_seeds, n_clips = seeds.pop(), len(targets)
    rng = np.random.default_rng(seed)
    out = {name: np.empty(replicates) for name in predictions}
    for r in range(replicates):
        drawn_seeds = rng.integers(0, n_seeds, n_seeds)
        clips = rng.integers(0, n_clips, n_clips)
        for name, per_seed in predictions.items():
            out[name][r] = np.mean([metric(np.asarray(per_seed[s])[clips], targets[clips]) for s in drawn_seeds])
    return out


def interval(point: float, replicates: np.ndarray, level: float = 0.95) -> Interval:
    low, high = np.percentile(replicates, [50 * (1 - level), 50 * (1 + level)])
    return Interval(float(point), float(low), float(high))
