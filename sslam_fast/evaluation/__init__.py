"""Evaluation: AudioSet/ESC-50 metrics, EAT/SSLAM balanced sampling and a polyphonic benchmark built
from packaged recordings."""

from .benchmark import RECORDED_CLASSES, SYNTHETIC_CLASSES, Benchmark, build_benchmark, recorded_sources
from .metrics import accuracy, average_precision, d_prime, mean_auc, mean_average_precision, roc_auc
from .sampling import BalancedSampler, balanced_weights, read_weights, write_weights

__all__ = [
    "RECORDED_CLASSES", "SYNTHETIC_CLASSES", "Benchmark", "build_benchmark", "recorded_sources",
    "accuracy", "average_precision", "d_prime", "mean_auc", "mean_average_precision", "roc_auc",
    "BalancedSampler", "balanced_weights", "read_weights", "write_weights",
]
