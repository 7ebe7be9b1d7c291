"""Evaluation: AudioSet/ESC-50 metrics and EAT/SSLAM balanced sampling."""

from .metrics import accuracy, average_precision, d_prime, mean_auc, mean_average_precision, roc_auc
from .sampling import BalancedSampler, balanced_weights, read_weights, write_weights

__all__ = [
    "accuracy", "average_precision", "d_prime", "mean_auc", "mean_average_precision", "roc_auc",
    "BalancedSampler", "balanced_weights", "read_weights", "write_weights",
]
