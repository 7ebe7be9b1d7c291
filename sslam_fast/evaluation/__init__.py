"""Evaluation: AudioSet/ESC-50 metrics, EAT/SSLAM balanced sampling, a polyphonic benchmark built
from packaged recordings, and a linear probe on frozen features."""

from .benchmark import RECORDED_CLASSES, SYNTHETIC_CLASSES, Benchmark, build_benchmark, recorded_sources
from .metrics import accuracy, average_precision, d_prime, mean_auc, mean_average_precision, roc_auc
from .probe import ProbeResult, compute_features, module_id, train_linear_probe
from .sampling import BalancedSampler, balanced_weights, read_weights, write_weights

__all__ = [
    "RECORDED_CLASSES", "SYNTHETIC_CLASSES", "Benchmark", "build_benchmark", "recorded_sources",
    "accuracy", "average_precision", "d_prime", "mean_auc", "mean_average_precision", "roc_auc",
    "ProbeResult", "compute_features", "module_id", "train_linear_probe",
    "BalancedSampler", "balanced_weights", "read_weights", "write_weights",
]
