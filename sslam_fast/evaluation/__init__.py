"""Evaluation: AudioSet/ESC-50 metrics."""

from .metrics import accuracy, average_precision, d_prime, mean_auc, mean_average_precision, roc_auc

__all__ = [
    "accuracy", "average_precision", "d_prime", "mean_auc", "mean_average_precision", "roc_auc",
]
