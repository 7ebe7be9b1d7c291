"""sslam_fast.evaluation: metrics against scikit-learn, EAT's balanced weights, the benchmark, the linear probe."""
import json
import math
import os

import numpy as np
import pytest
import torch

from sslam_fast import data
from sslam_fast.evaluation import (BalancedSampler, accuracy, average_precision, balanced_weights, build_benchmark,
                                   compute_features, d_prime, mean_auc, mean_average_precision, read_weights,
                                   recorded_sources, roc_auc, train_linear_probe, write_weights)

sk_metrics = pytest.importorskip("sklearn.metrics")
sf = pytest.importorskip("soundfile")

APT_PACKAGES = "alsa-utils sound-theme-freedesktop sound-icons asterisk-core-sounds-en-wav"


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


# ----------------------------------------------------------------------------------------------
# Balanced sampling (AST's gen_weight_file.py, read by EAT/SSLAM for AS-2M fine-tuning)
# ----------------------------------------------------------------------------------------------


def write_label_set(tmp_path):
    (tmp_path / "label_descriptors.csv").write_text("0,/m/a,A\n1,/m/b,B\n2,/m/c,C\n3,/m/d,D\n")
    (tmp_path / "train.lbl").write_text("x1\t/m/a\nx2\t/m/a,/m/b\nx3\t/m/a,/m/c\nx4\t/m/b\n")
    return tmp_path / "train.lbl"


def test_balanced_weights_by_hand(tmp_path):
    lbl = write_label_set(tmp_path)
    # counts: a 3, b 2, c 1, d 0; label weight 1000 / (count + 0.01)
    a, b, c = 1000 / 3.01, 1000 / 2.01, 1000 / 1.01
    expected = [a, a + b, a + c, b]
    np.testing.assert_allclose(balanced_weights(str(lbl)), expected, rtol=1e-15)
    np.testing.assert_allclose(balanced_weights([[0], [0, 1], [0, 2], [1]], num_classes=4), expected, rtol=1e-15)
    out = tmp_path / "train_weight.csv"
    write_weights(str(lbl), str(out))
    lines = out.read_text().splitlines()
    assert lines == [f"{w:.18e}" for w in expected]
    np.testing.assert_array_equal(read_weights(str(out)), np.array(expected))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        balanced_weights([[0], [3]], num_classes=2)


def test_balanced_sampler_is_deterministic_per_seed_and_epoch():
    weights = np.array([1.0, 5.0, 0.0, 2.0, 8.0, 1.0])
    sampler = BalancedSampler(weights, num_samples=4, seed=3)
    first = list(sampler)
    assert list(sampler) == first and len(set(first)) == 4 and 2 not in first  # no replacement, as EAT draws
    sampler.set_epoch(1)
    epoch_one = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert list(BalancedSampler(weights, num_samples=4, seed=3)) == first
    draws = [list(BalancedSampler(weights, num_samples=4, seed=3, epoch=e)) for e in range(1, 6)]
    assert draws[0] == epoch_one and any(d != first for d in draws)
    heavy = np.bincount(list(BalancedSampler(weights, num_samples=4000, replacement=True)), minlength=6)
    assert heavy[2] == 0 and heavy[4] > heavy[1] > heavy[0]
    with pytest.raises(ValueError, match="positive weight"):
        BalancedSampler(weights, num_samples=6)


# ----------------------------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------------------------

SMALL = dict(clip_seconds=1.0, train_clips_per_class=2, test_clips_per_class=1, train_scenes=12, test_scenes=6)


def check_benchmark(bench):
    descriptors = data.read_label_descriptors(bench.descriptors)
    assert list(descriptors) == bench.classes
    recordings = {}
    for split in ("mono_train", "mono_test", "poly_train", "poly_test"):
        manifest = data.read_manifest(bench.manifests[split])
        assert manifest.root == bench.root
        labels = data.read_labels(bench.labels[split], descriptors, manifest)
        events = json.load(open(bench.events[split]))
        assert events["synthesised"] == bench.synthesised
        assert [c["path"] for c in events["clips"]] == manifest.paths
        for i, (size, clip_labels, clip) in enumerate(zip(manifest.sizes, labels, events["clips"])):
            wave, rate = sf.read(manifest.path(i))
            assert rate == 16000 and len(wave) == size == int(bench.info["clip_seconds"] * 16000)
            assert np.abs(wave).max() > 0.01
            assert sorted(clip_labels) == sorted(descriptors[e["label"]] for e in clip["events"])
            assert len(set(clip_labels)) == len(clip_labels)
            assert (len(clip_labels) == 1) if split.startswith("mono") else (2 <= len(clip_labels) <= 4)
            for e in clip["events"]:
                assert 0 <= e["offset_s"] and e["offset_s"] + e["duration_s"] <= bench.info["clip_seconds"] + 1e-9
        recordings[split] = {e["recording"] for c in events["clips"] for e in c["events"]}
    assert not recordings["mono_train"] & recordings["mono_test"]
    assert not (recordings["mono_train"] | recordings["poly_train"]) & (recordings["mono_test"] | recordings["poly_test"])
    for entry in bench.info["classes"]:
        assert entry["train_recordings"] and entry["test_recordings"]
        assert not set(entry["train_recordings"]) & set(entry["test_recordings"])
    on_disk = json.load(open(os.path.join(bench.root, "benchmark.json")))
    assert on_disk == json.loads(json.dumps(bench.info)) and on_disk["synthesised"] == bench.synthesised


def test_benchmark_from_recordings(tmp_path):
    if sum(len(r) >= 2 for r in recorded_sources().values()) < 8:
        pytest.skip(f"recordings missing: apt-get install {APT_PACKAGES}")
    bench = build_benchmark(str(tmp_path / "a"), seed=5, source="recordings", **SMALL)
    assert not bench.synthesised and os.path.basename(bench.root) == "recordings"
    assert 8 <= len(bench.classes) <= 12 and "speech" in bench.classes
    assert "SYNTHESISED" not in bench.info["name"]
    check_benchmark(bench)
    again = build_benchmark(str(tmp_path / "b"), seed=5, source="recordings", **SMALL)
    for split, path in bench.manifests.items():
        assert open(bench.labels[split]).read() == open(again.labels[split]).read()
        first, second = data.read_manifest(path), data.read_manifest(again.manifests[split])
        for rel in first.paths:
            assert open(os.path.join(first.root, rel), "rb").read() == open(os.path.join(second.root, rel), "rb").read()
    other = build_benchmark(str(tmp_path / "c"), seed=6, source="recordings", **SMALL)
    assert open(other.labels["poly_train"]).read() != open(bench.labels["poly_train"]).read()


def test_benchmark_synthesised_fallback_is_labelled(tmp_path):
    bench = build_benchmark(str(tmp_path), seed=0, source="synthetic", **SMALL)
    assert bench.synthesised and os.path.basename(bench.root) == "synthesised"
    assert bench.info["synthesised"] is True and "SYNTHESISED" in bench.info["name"]
    assert all(label.startswith("synth_") for label in bench.classes)
    check_benchmark(bench)
    with pytest.raises(ValueError, match="source"):
        build_benchmark(str(tmp_path), source="nope")
    with pytest.raises(ValueError, match="test_fraction"):
        build_benchmark(str(tmp_path), source="synthetic", test_fraction=1.0)


def test_benchmark_scene_events_have_their_own_random_offsets_and_gains(tmp_path):
    bench = build_benchmark(str(tmp_path), seed=1, source="synthetic", clip_seconds=4.0, train_clips_per_class=0,
                            test_clips_per_class=0, train_scenes=60, test_scenes=0)
    scenes = [c["events"] for c in json.load(open(bench.events["poly_train"]))["clips"]]
    common_instant = 0
    for events in scenes:
        offsets = [e["offset_s"] for e in events]
        assert len(set(offsets)) == len(offsets)
        assert len({e["gain_db"] for e in events}) == len(events)
        assert all(-10.0 <= e["gain_db"] <= 0.0 for e in events)
        common_instant += max(offsets) < min(e["offset_s"] + e["duration_s"] for e in events)
    # synthesised events last 0.5-2 s in a 4 s clip: independent offsets often leave no instant
    # where all of a scene's events sound together
    assert 0 < common_instant < 0.8 * len(scenes)
    starts = np.array([e["offset_s"] for events in scenes for e in events])
    assert starts.min() < 0.5 and starts.max() > 2.0 and len(np.unique(starts)) > 0.9 * len(starts)


# ----------------------------------------------------------------------------------------------
# Linear probe
# ----------------------------------------------------------------------------------------------


def test_probe_multiclass_separable():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=g) * 3
    labels = torch.arange(300) % 5
    x = centres[labels] + torch.randn(300, 16, generator=g)
    result = train_linear_probe(x[:200], labels[:200], x[200:], labels[200:], task="multiclass", epochs=30, batch_size=32)
    assert result.final_metric > 0.9  # chance is 0.2
    assert result.curve["train_loss"][-1] < 0.5 * result.curve["train_loss"][0]
    assert result.scores.shape == (100, 5)
    again = train_linear_probe(x[:200], labels[:200], x[200:], labels[200:], task="multiclass", epochs=30, batch_size=32)
    assert torch.equal(again.weight, result.weight) and again.curve == result.curve


def test_probe_multilabel_map_high_and_loss_falls():
    g = torch.Generator().manual_seed(1)
    targets = (torch.rand(400, 6, generator=g) < 0.3).float()
    x = targets @ torch.randn(6, 24, generator=g) + 0.3 * torch.randn(400, 24, generator=g)
    result = train_linear_probe(x[:300], targets[:300], x[300:], targets[300:], task="multilabel", epochs=50, batch_size=64)
    assert result.final_metric > 0.9
    assert result.curve["train_loss"][-1] < 0.5 * result.curve["train_loss"][0]
    assert len(result.curve["eval_mAP"]) == 50
    torch.testing.assert_close(result.predict(x[300:]), result.scores)


def test_features_are_cached_and_reused(tmp_path):
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    calls = []
    encoder.register_forward_hook(lambda *_: calls.append(1))
    inputs = torch.randn(10, 3, 4)
    loader = [{"fbank": inputs[:6], "index": torch.arange(6)}, {"fbank": inputs[6:], "index": torch.arange(6, 10)}]
    first = compute_features(encoder, loader, cache_path=str(tmp_path))
    assert len(calls) == 2 and first.shape == (10, 4) and len(os.listdir(tmp_path)) == 1
    second = compute_features(encoder, loader, cache_path=str(tmp_path))
    assert len(calls) == 2 and torch.equal(first, second)
    torch.testing.assert_close(compute_features(encoder, inputs, batch_size=4), first)
    assert len(calls) == 2 + 3
    assert torch.equal(compute_features(encoder, inputs, cache_path=str(tmp_path), batch_size=4), first)
    assert len(calls) == 2 + 3  # the same clips batched differently: the same cache entry
    with torch.no_grad():
        encoder[1].bias.add_(1.0)
    compute_features(encoder, loader, cache_path=str(tmp_path))
    assert len(calls) == 2 + 3 + 2 and len(os.listdir(tmp_path)) == 2  # new weights, a new entry
    norm = torch.nn.BatchNorm1d(4)  # a 0-d buffer (num_batches_tracked) in the state dict
    compute_features(norm, torch.randn(3, 4), cache_path=str(tmp_path))
    assert norm.training
    plain_calls = []

    def encoder_fn(batch):
        plain_calls.append(1)
        return batch.flatten(1)[:, :2]

    compute_features(encoder_fn, inputs, cache_path=str(tmp_path), checkpoint_id="ckpt-a")
    compute_features(encoder_fn, inputs, cache_path=str(tmp_path), checkpoint_id="ckpt-a")
    assert len(plain_calls) == 1
    compute_features(encoder_fn, inputs + 1, cache_path=str(tmp_path), checkpoint_id="ckpt-a")
    assert len(plain_calls) == 2
    with pytest.raises(ValueError, match="checkpoint_id"):
        compute_features(encoder_fn, inputs, cache_path=str(tmp_path))


def test_feature_cache_runs_nothing_from_a_crafted_entry_and_recomputes_a_damaged_one(tmp_path):
    from sslam_fast import CheckpointError
    from helpers import Payload

    inputs = torch.randn(4, 6)
    calls = []

    def encoder_fn(batch):
        calls.append(1)
        return batch[:, :2]

    features = compute_features(encoder_fn, inputs, cache_path=str(tmp_path), checkpoint_id="ckpt")
    (entry,) = [tmp_path / name for name in os.listdir(tmp_path)]
    marker = tmp_path / "marker"
    torch.save({"x": Payload(os.system, f"touch {marker}")}, entry)
    with pytest.raises(CheckpointError, match=f"{entry.name}.*refused"):
        compute_features(encoder_fn, inputs, cache_path=str(tmp_path), checkpoint_id="ckpt")
    assert not marker.exists() and len(calls) == 1
    entry.write_bytes(entry.read_bytes()[:100])  # half written: computed again and replaced
    assert torch.equal(compute_features(encoder_fn, inputs, cache_path=str(tmp_path), checkpoint_id="ckpt"), features)
    assert len(calls) == 2 and torch.equal(torch.load(entry, weights_only=True), features)
