"""sslam_fast.evaluation: metrics against scikit-learn."""
import math

import numpy as np
import pytest
import torch

from sslam_fast.evaluation import accuracy, average_precision, d_prime, mean_auc, mean_average_precision, roc_auc

sk_metrics = pytest.importorskip("sklearn.metrics")


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def random_case(rng):
    """Scores with many ties (few distinct values), some classes without positives, some all positive."""
    n, c = int(rng.integers(1, 60)), int(rng.integers(1, 8))
    levels = int(rng.integers(1, 6)) if rng.random() < 0.6 else 0
    scores = rng.integers(0, levels, size=(n, c)).astype(float) / max(levels, 1) if levels else rng.standard_normal((n, c))
    targets = (rng.random((n, c)) < rng.uniform(0.05, 0.7)).astype(float)
    targets[:, rng.random(c) < 0.15] = 0.0
    targets[:, rng.random(c) < 0.15] = 1.0
    return scores, targets


def test_average_precision_matches_sklearn_on_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(400):
        scores, targets = random_case(rng)
        ap = average_precision(scores, targets)
        has_positive = targets.sum(axis=0) > 0
        assert np.isnan(ap[~has_positive]).all()
        for k in np.flatnonzero(has_positive):
            assert abs(ap[k] - sk_metrics.average_precision_score(targets[:, k], scores[:, k])) < 1e-6
        if has_positive.any():
            expected = np.mean([sk_metrics.average_precision_score(targets[:, k], scores[:, k]) for k in np.flatnonzero(has_positive)])
            assert abs(mean_average_precision(torch.from_numpy(scores), torch.from_numpy(targets)) - expected) < 1e-6


def test_roc_auc_and_d_prime_match_sklearn_and_scipy_definition():
    rng = np.random.default_rng(1)
    for _ in range(300):
        scores, targets = random_case(rng)
        auc = roc_auc(scores, targets)
        defined = (targets.sum(axis=0) > 0) & (targets.sum(axis=0) < len(targets))
        assert np.isnan(auc[~defined]).all()
        for k in np.flatnonzero(defined):
            assert abs(auc[k] - sk_metrics.roc_auc_score(targets[:, k], scores[:, k])) < 1e-6
        if defined.any():
            assert abs(mean_auc(scores, targets) - auc[defined].mean()) < 1e-12
    assert d_prime(0.5) == 0.0
    assert abs(d_prime(0.975) - math.sqrt(2) * 1.959963984540054) < 1e-9
    np.testing.assert_allclose(d_prime(np.array([0.5, 0.8413447460685429])), [0.0, math.sqrt(2)], atol=1e-9)


def test_accuracy_top1_and_top_k():
    rng = np.random.default_rng(2)
    for _ in range(100):
        n, c = int(rng.integers(1, 40)), int(rng.integers(2, 9))
        scores = rng.integers(0, 3, size=(n, c)).astype(float) if rng.random() < 0.5 else rng.standard_normal((n, c))
        labels = rng.integers(0, c, size=n)
        assert abs(accuracy(scores, labels) - sk_metrics.accuracy_score(labels, scores.argmax(axis=1))) < 1e-12
        assert accuracy(torch.from_numpy(scores), np.eye(c)[labels]) == accuracy(scores, labels)
        k = int(rng.integers(1, c))
        if c > 2 and len(np.unique(scores)) == scores.size:  # sklearn breaks ties differently
            expected = sk_metrics.top_k_accuracy_score(labels, scores, k=k, labels=np.arange(c))
            assert abs(accuracy(scores, labels, top_k=k) - expected) < 1e-12
        assert accuracy(scores, labels, top_k=c) == 1.0


def test_metrics_name_bad_shapes():
    with pytest.raises(ValueError, match=r"scores \(4, 3\).*targets \(4, 2\)"):
        mean_average_precision(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"\(5,\)"):
        average_precision(np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        accuracy(np.zeros((3, 4)), np.zeros(2, dtype=int))
    with pytest.raises(ValueError, match="positive"):
        mean_average_precision(np.zeros((4, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="0/1"):
        average_precision(np.zeros((2, 1)), np.array([[0.5], [1.0]]))
