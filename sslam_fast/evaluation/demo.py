"""`sslam-fast demo`: stage 1 (EAT) against stage 1 + stage 2 (SSLAM) on a small polyphonic benchmark,
on a CPU, end to end.

1. Build the benchmark (`build_benchmark`: real recordings from Debian packages when installed,
   else the labelled synthesised fallback).
2. Pretrain a small model on the benchmark's training clips, without their labels, at equal
   compute in updates and clips: "stage 1" runs stage 1 for N updates; "SSLAM" runs stage 1 for
   N/2 updates, then stage 2 for N/2 from that checkpoint with a fresh optimizer and schedule at a
   tenth of the peak LR (the released recipe's ratio, configs/as2m.json vs as2m_sslam.json).
   Stage 2 halves the masks per input as the recipe does, so both runs see the same clips and the
   student the same number of masked views per update; a stage-2 update costs more (the teacher
   also encodes the mixtures). Each stage has its own full warmup + cosine schedule.
3. Linear probe (`train_linear_probe`, 50 epochs at LR 1e-3) on the frozen students' CLS features:
   single-label accuracy on the monophonic test clips, mAP on the polyphonic test scenes; a
   randomly initialised encoder of the same shape is the floor.
4. Print the table; write results.json and demo.png (training curves, scores side by side).

The numbers are whatever this run gives: nothing is tuned for stage 2 to win.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass
from typing import Any, Dict, List

import numpy as np
import torch

from .. import data as _data
from ..config import SSLAMConfig
from ..data import audio as _audio
from ..model import Encoder
from .benchmark import build_benchmark
from .probe import compute_features, train_linear_probe

logger = logging.getLogger("sslam_fast.demo")


@dataclass(frozen=True)
class DemoSize:
    clip_seconds: float
    target_length: int
    train_clips_per_class: int
    test_clips_per_class: int
    train_scenes: int
    test_scenes: int
    updates: int  # per pretraining run (the SSLAM run: half stage 1, half stage 2)
    mix: tuple  # (window, w1_max, w2_max) in frames, the recipe's 240/496/782 of 1024 scaled


FULL = DemoSize(4.0, 400, 12, 6, 120, 60, 1200, (96, 192, 304))
QUICK = DemoSize(2.0, 192, 4, 2, 40, 20, 60, (48, 80, 144))

MODEL = {"embed_dim": 64, "depth": 4, "num_heads": 4, "decoder_layers": 2, "decoder_groups": 16,
         "average_top_k_layers": 4, "attention": "sdpa", "ema_decay": 0.999, "ema_end_decay": 0.9999}
BATCH = 8
PEAK_LR = 5e-4


def _pretrain(run_dir: str, manifest: str, size: DemoSize, norm: tuple, stage: int, updates: int, seed: int,
              init_from: str = "", precision: str = "fp32") -> Dict[str, Any]:
    from .. import train

    model = dict(MODEL, stage=stage, clone_batch=4 if stage == 1 else 2, ema_anneal_end_step=updates,
                 mix_window=size.mix[0], mix_w1_max=size.mix[1], mix_w2_max=size.mix[2])
    values = [f"model.{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in model.items()] + [
        f"data.manifest={manifest}", f"data.target_length={size.target_length}", f"data.norm_mean={norm[0]}",
        f"data.norm_std={norm[1]}", "data.backend=torch", "data.num_workers=1",
        f"train.global_batch={BATCH}", f"train.max_micro_batch={BATCH}", f"train.max_steps={updates}",
        f"train.precision={precision}", f"train.seed={seed}", f"train.collapse_after={updates}",
        f"optim.lr={PEAK_LR if stage == 1 else PEAK_LR / 10}", f"optim.warmup_steps={max(1, updates // 10)}",
        f"optim.cosine_steps={updates}",
        f"checkpoint.dir={run_dir}", f"checkpoint.every_steps={updates}", "checkpoint.keep_last=1",
        f"logging.every_steps={max(1, updates // 60)}", "logging.progress_bar=true",
        f"logging.tensorboard={str(_importable('tensorboard')).lower()}",
    ]
    if init_from:
        values.append(f"train.init_from={init_from}")
    start = time.perf_counter()
    status = train.main([arg for value in values for arg in ("--set", value)])
    if status != 0:
        raise RuntimeError(f"pretraining in {run_dir} stopped with status {status}")
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        lines = [json.loads(line) for line in f]
    return {"dir": run_dir, "stage": stage, "updates": updates, "seconds": time.perf_counter() - start,
            "checkpoint": os.path.join(run_dir, f"step_{updates:09d}"),
            "curve": {"step": [line["step"] for line in lines], "loss": [line["loss"] for line in lines]}}


def _features(encoder: Encoder, clips: torch.Tensor) -> torch.Tensor:
    return compute_features(lambda x: encoder.extract_features(x, granularity="utterance"), clips, batch_size=32)


def _load_split(bench, split: str, size: DemoSize, norm: tuple):
    manifest = _data.read_manifest(bench.manifests[split])
    table = _data.read_label_descriptors(bench.descriptors)
    labels = _data.read_labels(bench.labels[split], table, manifest)
    clips = torch.stack([_audio.load_features(manifest.path(i), size.target_length, norm[0], norm[1])
                         for i in range(len(manifest))])[:, None]
    targets = torch.zeros(len(labels), len(table))
    for i, clip in enumerate(labels):
        targets[i, clip] = 1.0
    return clips, targets


def _plot(results: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["pretraining"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=80)
    s1 = runs["stage1"]["curve"]
    left.plot(s1["step"], s1["loss"], label="stage 1 (EAT)", color="tab:blue")
    a, b = runs["sslam_stage1"]["curve"], runs["sslam_stage2"]["curve"]
    half = runs["sslam_stage1"]["updates"]
    left.plot(a["step"], a["loss"], label="SSLAM run: stage 1", color="tab:orange", linestyle="--")
    left.plot([half + s for s in b["step"]], b["loss"], label="SSLAM run: stage 2 (+ SRL loss)", color="tab:red")
    left.axvline(half, color="grey", linewidth=0.8)
    left.set_xlabel("update")
    left.set_ylabel("pretraining loss")
    left.set_yscale("log")
    left.set_title("pretraining, equal updates and clips")
    left.legend(fontsize=8)
    names = list(results["scores"])
    x = np.arange(2)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        s = results["scores"][name]
        bars = right.bar(x + (i - (len(names) - 1) / 2) * width, [s["mono_accuracy"], s["poly_mAP"]], width, label=name)
        right.bar_label(bars, fmt="%.1f", fontsize=7)
    right.set_xticks(x, ["monophonic\naccuracy (%)", "polyphonic\nmAP (%)"])
    right.set_ylim(0, 100)
    right.set_title("linear probe on frozen features" + (" (SYNTHESISED benchmark)" if results["benchmark"]["synthesised"] else ""))
    right.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_table(results: Dict[str, Any]) -> str:
    rows = [("model", "pretraining", "mono acc %", "poly mAP %")]
    for name, s in results["scores"].items():
        rows.append((name, s["pretraining"], f"{s['mono_accuracy']:.1f}", f"{s['poly_mAP']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class DemoError(RuntimeError):
    """The demo cannot run here (a package it needs is missing); says what to install."""


NEEDS = {"deepspeed": "deepspeed", "matplotlib": "matplotlib"}  # import name -> distribution


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


def check_needs() -> None:
    """Every package the demo uses imports, before any work is done (the demo's last step draws)."""
    missing = [dist for name, dist in NEEDS.items() if not _importable(name)]
    if missing:
        raise DemoError(f"the demo needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
                        f"installed: pip install {' '.join(missing)} (both are dependencies of `pip install sslam-fast`)")


def run_demo(out_dir: str, quick: bool = False, seed: int = 0, precision: str = "fp32") -> Dict[str, Any]:
    """The demo; ``precision`` "bf16" pretrains under CPU bf16 autocast (fp32 masters), fp32 otherwise."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    check_needs()
    size = QUICK if quick else FULL
    started = time.perf_counter()
    out_dir = os.path.abspath(out_dir)
    runs_dir = os.path.join(out_dir, "runs")
    shutil.rmtree(runs_dir, ignore_errors=True)  # the demo's own pretraining runs: start afresh
    os.makedirs(runs_dir)

    bench = build_benchmark(os.path.join(out_dir, "benchmark"), seed=seed, clip_seconds=size.clip_seconds,
                            train_clips_per_class=size.train_clips_per_class, test_clips_per_class=size.test_clips_per_class,
                            train_scenes=size.train_scenes, test_scenes=size.test_scenes)
    first, second = (_data.read_manifest(bench.manifests[s]) for s in ("mono_train", "poly_train"))
    manifest = os.path.join(runs_dir, "pretrain.tsv")
    _data.Manifest(manifest, bench.root, first.paths + second.paths, first.sizes + second.sizes).write(manifest)
    mean, std, _ = _data.norm_stats(manifest, size.target_length)
    norm = (round(mean, 4), round(std, 4))
    built = time.perf_counter()

    half = size.updates // 2
    pretraining = {
        "stage1": _pretrain(os.path.join(runs_dir, "stage1"), manifest, size, norm, 1, size.updates, seed + 1,
                            precision=precision),
        "sslam_stage1": _pretrain(os.path.join(runs_dir, "sslam_stage1"), manifest, size, norm, 1, half, seed + 1,
                                  precision=precision),
    }
    pretraining["sslam_stage2"] = _pretrain(os.path.join(runs_dir, "sslam_stage2"), manifest, size, norm, 2,
                                            size.updates - half, seed + 1, init_from=pretraining["sslam_stage1"]["checkpoint"],
                                            precision=precision)
    pretrained = time.perf_counter()

    from ..released.formats import load_pretrainer

    torch.manual_seed(seed)
    encoders = {
        "random init": (Encoder(SSLAMConfig(**dict(MODEL, clone_batch=4))), "none"),
        "stage 1 (EAT)": (load_pretrainer(os.path.join(pretraining["stage1"]["checkpoint"], "train.pt")).student,
                          f"stage 1: {size.updates} updates"),
        "stage 1 + 2 (SSLAM)": (load_pretrainer(os.path.join(pretraining["sslam_stage2"]["checkpoint"], "train.pt")).student,
                                f"stage 1: {half} + stage 2: {size.updates - half} updates"),
    }
    splits = {split: _load_split(bench, split, size, norm) for split in ("mono_train", "mono_test", "poly_train", "poly_test")}
    scores: Dict[str, Dict[str, Any]] = {}
    for name, (encoder, how) in encoders.items():
        feats = {split: _features(encoder, clips) for split, (clips, _) in splits.items()}
        mono = train_linear_probe(feats["mono_train"], splits["mono_train"][1].argmax(1), feats["mono_test"],
                                  splits["mono_test"][1].argmax(1), task="multiclass", seed=seed,
                                  num_classes=len(bench.classes))
        poly = train_linear_probe(feats["poly_train"], splits["poly_train"][1], feats["poly_test"], splits["poly_test"][1],
                                  task="multilabel", seed=seed)
        scores[name] = {"pretraining": how, "mono_accuracy": 100 * mono.final_metric, "poly_mAP": 100 * poly.final_metric}
    finished = time.perf_counter()

    results = {
        "quick": quick,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "device": "cpu"},
        "benchmark": {"root": bench.root, "synthesised": bench.synthesised, "classes": bench.classes,
                      "clip_seconds": size.clip_seconds,
                      "clips": {split: len(clips) for split, (clips, _) in splits.items()},
                      "chance_mono_accuracy": 100.0 / len(bench.classes)},
        "pretraining": {"clips_per_update": BATCH, "updates_per_run": size.updates, "model": MODEL, "precision": precision,
                        "norm_mean": norm[0], "norm_std": norm[1], "target_length": size.target_length,
                        **pretraining},
        "scores": scores,
        "seconds": {"benchmark": built - started, "pretraining": pretrained - built, "probes": finished - pretrained,
                    "total": finished - started},
        "png": os.path.join(out_dir, "demo.png"),
    }
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)  # before the plot: a failure there loses no result
    _plot(results, results["png"])
    return results


def summary(results: Dict[str, Any]) -> List[str]:
    b, s = results["benchmark"], results["seconds"]
    kind = "SYNTHESISED fallback" if b["synthesised"] else "real recordings"
    return [
        f"benchmark: {len(b['classes'])} classes ({kind}), {b['clip_seconds']:g} s clips, "
        + ", ".join(f"{k} {v}" for k, v in b["clips"].items()) + f"; mono chance {b['chance_mono_accuracy']:.1f}%",
        f"pretraining: {results['pretraining']['updates_per_run']} updates of {results['pretraining']['clips_per_update']} "
        f"clips per run",
        "",
        format_table(results),
        "",
        f"time: benchmark {s['benchmark']:.0f} s, pretraining {s['pretraining']:.0f} s, probes {s['probes']:.0f} s, "
        f"total {s['total']:.0f} s ({results['machine']['cpus']} CPUs, {results['date']})",
        f"wrote {os.path.join(os.path.dirname(results['png']), 'results.json')} and {results['png']}",
    ]
