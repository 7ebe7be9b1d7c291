"""`sslam-fast demo`: --quick end to end as CI runs it (twice: the same seed gives the same table),
the below-random warning, the bootstrap interval, the probe inputs, and the instrument benchmark's labels."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from sslam_fast import data
from sslam_fast.evaluation import benchmark, demo
from sslam_fast.evaluation.benchmark import INSTRUMENT_FAMILIES, build_benchmark, instruments_available
from sslam_fast.evaluation.intervals import Interval, bootstrap_replicates, interval

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


SCORED = {"log-mel mean+std", "random init", "stage 1 (EAT)", "stage 1 + 2 (SSLAM)"}


def _quick_demo(out):
    # `python -m sslam_fast.cli` is the `sslam-fast` entry point, run from this checkout
    done = subprocess.run([sys.executable, "-m", "sslam_fast.cli", "demo", "--quick", "--seed", "3", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, json.load(open(out / "results.json"))


def _table(stdout):
    """The printed results (from the benchmark line on; libraries log before it) without the
    time line and the paths."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("benchmark: "))
    return [line for line in lines[start:] if not line.startswith(("time:", "wrote "))]


@pytest.mark.slow
def test_demo_quick_twice_with_one_seed_gives_the_same_table(tmp_path):
    first_out, first = _quick_demo(tmp_path / "a")
    second_out, second = _quick_demo(tmp_path / "b")
    assert _table(first_out) == _table(second_out)
    assert first["scores"] == second["scores"] and first["differences"] == second["differences"]
    assert [r["sslam"]["curve"] for r in first["pretraining"]["runs"]] == [r["sslam"]["curve"] for r in second["pretraining"]["runs"]]

    assert "stage 1 + 2 (SSLAM)" in first_out and "monophonic accuracy %" in first_out and "chance" in first_out
    assert first["quick"] is True and first["seeds"] == [3, 4]
    assert set(first["scores"]) == SCORED
    for score in first["scores"].values():
        assert [r["seed"] for r in score["per_seed"]] == [3, 4]
        for task in ("mono_accuracy", "poly_mAP"):
            assert 0.0 <= score[task]["low"] <= score[task]["mean"] <= score[task]["high"] <= 100.0
    assert {(d["a"], d["b"]) for d in first["differences"]} == {("stage 1 (EAT)", "random init"),
                                                               ("stage 1 + 2 (SSLAM)", "random init"),
                                                               ("stage 1 + 2 (SSLAM)", "stage 1 (EAT)")}
    for runs in first["pretraining"]["runs"]:
        assert runs["start"]["stage"] == runs["stage1"]["stage"] == 1 and runs["sslam"]["stage"] == 2
        assert runs["stage1"]["updates"] == runs["sslam"]["updates"] == runs["start"]["updates"]
        assert len(runs["start"]["curve"]["loss"]) > 1 and len(runs["sslam"]["curve"]["loss"]) > 1
    bench = first["benchmark"]
    assert set(bench["clips"]) == {"mono_train", "mono_test", "poly_train", "poly_test"} and len(bench["classes"]) >= 2
    assert first["chance"]["mono_accuracy"] == pytest.approx(100 / len(bench["classes"]))
    assert {"sslam_fast", "torch", "numpy", "python"} <= set(first["versions"])
    assert first["machine"]["cpus"] >= 1 and first["date"]
    assert {"benchmark", "pretraining seed 3", "probes seed 4", "bootstrap", "total"} <= set(first["seconds"])
    png = tmp_path / "a" / "demo.png"
    assert png.is_file() and open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def _results(mono, poly):
    """A results dict as run_demo writes it, with these mean scores per model."""
    def score(m, p):
        return {"features": "x", "per_seed": [], "mono_accuracy": {"mean": m, "low": m - 5, "high": m + 5},
                "poly_mAP": {"mean": p, "low": p - 5, "high": p + 5}}
    return {"scores": {name: score(m, p) for name, m, p in zip(demo.MODELS, mono, poly)},
            "chance": {"mono_accuracy": 10.0, "poly_mAP": 30.0}, "differences": [], "seeds": [0, 1, 2],
            "benchmark": {"source": "instruments", "classes": ["a"] * 10, "clip_seconds": 4.0, "clips": {"mono_test": 60}},
            "pretraining": {"updates_per_run": 10, "clips_per_update": 8},
            "seconds": {"benchmark": 1.0, "pretraining seed 0": 2.0, "probes seed 0": 3.0, "total": 6.0},
            "machine": {"cpus": 2}, "date": "today", "png": "/x/demo.png"}


def test_a_pretrained_model_below_random_init_is_warned_about():
    #                    log-mel  random  stage 1  SSLAM
    results = _results((50.0, 20.0, 25.0, 19.5), (60.0, 40.0, 39.0, 45.0))
    results["warnings"] = demo.below_random_warnings(results)
    assert results["warnings"] == [
        "WARNING: stage 1 (EAT) scores below random init on polyphonic mAP %: 39.0 vs 40.0 (pretraining did not help "
        "this representation here)",
        "WARNING: stage 1 + 2 (SSLAM) scores below random init on monophonic accuracy %: 19.5 vs 20.0 (pretraining did "
        "not help this representation here)"]
    printed = demo.summary(results)
    assert all(line in printed for line in results["warnings"])
    above = _results((10.0, 20.0, 20.0, 21.0), (10.0, 40.0, 41.0, 40.0))
    assert demo.below_random_warnings(above) == []


def test_probe_inputs_pool_the_blocks_tokens_as_documented():
    """`cls_layers` (the demo's input) is the last block's CLS token and each block's patch tokens
    mean-pooled, in block order; `cls_mean` its first and last D columns; an unknown input is refused."""
    torch.manual_seed(1)
    cfg = demo.SSLAMConfig(**dict(demo.RECIPE.model, clone_batch=1))
    encoder = demo.Encoder(cfg).eval()
    x = torch.randn(3, 1, 48, 128)  # 3 time x 8 frequency patches
    d = cfg.embed_dim
    with torch.no_grad():
        h = encoder.norm(encoder.tokens(x))
        blocks = []
        for block in encoder.blocks:
            h, _ = block(h)
            blocks.append(h)
        layers = demo.embed(encoder, x, "cls_layers", 2)
        cls_mean = demo.embed(encoder, x, "cls_mean", 2)
    assert layers.shape == (3, (1 + cfg.depth) * d)
    torch.testing.assert_close(layers[:, :d], blocks[-1][:, 0])
    for i, out in enumerate(blocks):
        torch.testing.assert_close(layers[:, (1 + i) * d:(2 + i) * d], out[:, 1:].mean(dim=1))
    torch.testing.assert_close(cls_mean, torch.cat([layers[:, :d], layers[:, -d:]], dim=1), rtol=1e-5, atol=1e-5)
    assert demo.RECIPE.probe_input == "cls_layers" and demo.RECIPE.probe_input in demo.PROBE_INPUTS
    with pytest.raises(ValueError, match="probe_input"):
        demo.embed(encoder, x, "cls_max", 2)


def test_bootstrap_interval_matches_a_hand_computed_case():
    accuracy = lambda p, t: 100.0 * float(np.mean(p.argmax(1) == t))  # noqa: E731
    targets = np.zeros(4, dtype=int)
    one_right = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])  # clip 0 right, 1-3 wrong
    # One seed, 4 clips drawn with replacement: the number right is Binomial(4, 1/4), P(0) = 0.316,
    # P(<= 2) = 0.949, P(<= 3) = 0.996, so the 2.5 and 97.5 percentiles are 0 and 3 right of 4.
    reps = bootstrap_replicates(accuracy, {"m": [one_right]}, targets, replicates=4000, seed=1)
    got = interval(25.0, reps["m"])
    assert (got.low, got.high) == (0.0, 75.0) and reps["m"].mean() == pytest.approx(25.0, abs=1.5)
    # Two seeds, one right on every clip and one wrong on every clip: drawing the seeds with
    # replacement gives 100 (1/4), 50 (1/2) or 0 (1/4) whatever clips are drawn.
    right, wrong = np.array([[1.0, 0.0]] * 4), np.array([[0.0, 1.0]] * 4)
    reps = bootstrap_replicates(accuracy, {"m": [right, wrong], "same": [right, wrong]}, targets, replicates=4000, seed=2)
    assert set(reps["m"]) == {0.0, 50.0, 100.0} and (reps["m"] == 50.0).mean() == pytest.approx(0.5, abs=0.03)
    assert interval(50.0, reps["m"]) == Interval(50.0, 0.0, 100.0)
    # Models are scored on the same draws (paired): a model against itself differs by exactly 0.
    gap = interval(0.0, reps["m"] - reps["same"])
    assert (gap.low, gap.high) == (0.0, 0.0) and not gap.excludes(0.0)
    with pytest.raises(ValueError, match="same, non-zero number of seeds"):
        bootstrap_replicates(accuracy, {"a": [right], "b": [right, wrong]}, targets)


@pytest.mark.skipif(not instruments_available(), reason="apt-get install fluidsynth fluid-soundfont-gm")
def test_instrument_benchmark_labels_are_the_union_of_the_rendered_parts(tmp_path):
    """Each clip is rebuilt from its events (the rendered phrases, cropped, scaled, placed): the
    audio matches the wav and the clip's labels are exactly its events' families."""
    bench = build_benchmark(str(tmp_path), seed=7, source="instruments", clip_seconds=1.0, train_clips_per_class=1,
                            test_clips_per_class=1, train_scenes=6, test_scenes=6)
    assert not bench.synthesised and bench.classes == list(INSTRUMENT_FAMILIES) and bench.info["source"] == "instruments"
    _, waves = benchmark._instrument_recordings(7)
    table = data.read_label_descriptors(bench.descriptors)
    families = {entry["label"]: entry for entry in bench.info["classes"]}
    for split in ("mono_train", "mono_test", "poly_train", "poly_test"):
        manifest = data.read_manifest(bench.manifests[split])
        labels = data.read_labels(bench.labels[split], table, manifest)
        part = "test_recordings" if split.endswith("test") else "train_recordings"
        for i, clip in enumerate(json.load(open(bench.events[split]))["clips"]):
            events = clip["events"]
            assert sorted(labels[i]) == sorted(table[e["label"]] for e in events)
            assert len({e["label"] for e in events}) == len(events) == (1 if split.startswith("mono") else len(events))
            if split.startswith("poly"):
                assert 2 <= len(events) <= 4
            expected = np.zeros(16000)
            for e in events:
                family, program, _ = e["recording"].split("/")
                assert family == "gm:" + e["label"] and e["recording"] in families[e["label"]][part]
                assert int(program[len("program"):]) in INSTRUMENT_FAMILIES[e["label"]][1]
                start, length, offset = (int(round(e[k] * 16000)) for k in ("crop_start_s", "duration_s", "offset_s"))
                piece = waves[e["recording"]][start: start + length]
                expected[offset: offset + length] += piece * 0.1 * 10 ** (e["gain_db"] / 20) / np.sqrt(np.mean(piece ** 2))
            expected *= min(1.0, 0.99 / np.abs(expected).max())
            wave, _ = sf.read(manifest.path(i))
            assert np.abs(wave - expected).max() < 2e-4 and np.abs(wave).max() > 0.01
    for entry in bench.info["classes"]:
        assert entry["train_recordings"] and entry["test_recordings"]
        assert not set(entry["train_recordings"]) & set(entry["test_recordings"])


@pytest.mark.skipif(not instruments_available(), reason="apt-get install fluidsynth fluid-soundfont-gm")
def test_instrument_benchmark_renders_the_phrases_per_program_it_is_given(tmp_path):
    """phrases_per_program sets each family's recordings (programs x phrases; the drum kit 8x), split
    into disjoint train and test recordings; the demo's full size renders 8 per program."""
    bench = build_benchmark(str(tmp_path), seed=2, source="instruments", clip_seconds=1.0, train_clips_per_class=1,
                            test_clips_per_class=1, train_scenes=2, test_scenes=2, phrases_per_program=3)
    for entry in bench.info["classes"]:
        programs = INSTRUMENT_FAMILIES[entry["label"]][1]
        recordings = entry["train_recordings"] + entry["test_recordings"]
        expected = {f"gm:{entry['label']}/program{p:03d}/phrase{k}" for p in programs
                    for k in range(3 * (8 if entry["label"] == "drums" else 1))}
        assert len(recordings) == len(expected) and set(recordings) == expected
        assert not set(entry["train_recordings"]) & set(entry["test_recordings"])
    assert demo.FULL.phrases_per_program == 8 and demo.QUICK.phrases_per_program == benchmark.INSTRUMENT_PHRASES
    with pytest.raises(ValueError, match="phrases_per_program must be >= 1, got 0"):
        build_benchmark(str(tmp_path / "none"), source="instruments", phrases_per_program=0)


def test_demo_says_what_to_install_before_any_work(tmp_path):
    """Without matplotlib (or deepspeed) the demo stops at once with one line, writing nothing."""
    code = (
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'matplotlib':\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "from sslam_fast.cli import main\n"
        f"sys.exit(main(['demo', '--quick', '--out', {str(tmp_path / 'demo')!r}]))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip() == ("sslam-fast demo: error: the demo needs matplotlib, which is not installed: "
                                   "pip install matplotlib (both are dependencies of `pip install sslam-fast`)")
    assert not (tmp_path / "demo").exists()


def test_results_are_written_before_the_plot(tmp_path, monkeypatch):
    """A failure while drawing loses nothing: results.json is complete when the plot starts."""
    tiny = demo.DemoSize(1.0, 96, 2, 1, 8, 4, 4, 1, (16, 16, 64))
    monkeypatch.setattr(demo, "QUICK", tiny)
    seen = {}

    def plot(results, path):
        with open(tmp_path / "results.json") as f:
            seen.update(json.load(f))
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(demo, "_plot", plot)
    with pytest.raises(RuntimeError, match="drawing failed"):
        demo.run_demo(str(tmp_path), quick=True)
    assert set(seen["scores"]) == SCORED and seen["seeds"] == [0]
    assert seen["pretraining"]["runs"][0]["stage1"]["updates"] == 4
