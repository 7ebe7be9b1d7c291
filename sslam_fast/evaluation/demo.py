"""`sslam-fast demo`: what pretraining buys, and what stage 2 (SSLAM) adds to stage 1 (EAT), on a
small polyphonic benchmark, on a CPU, end to end, with 95 % intervals over seeds and test clips.

1. Build the benchmark (`build_benchmark`): General MIDI instrument families rendered by
   fluidsynth when it and a soundfont are installed, else real recordings from Debian packages,
   else the labelled synthesised fallback.
2. For each of `size.seeds` seeds, pretrain a small model on the benchmark's training clips,
   without their labels: stage 1 for `size.start` updates from scratch (the shared start), then two
   continuations of U = `size.updates` updates each from that checkpoint, with a fresh optimizer and warm-up +
   cosine schedule at a tenth of the peak LR (the released recipe's ratio, configs/as2m.json vs
   as2m_sslam.json): "stage 1 (EAT)" continues stage 1, "stage 1 + 2 (SSLAM)" runs stage 2. The
   two differ only in the objective of their last U updates; both see the same clips and the
   student the same number of masked views (stage 2 halves the masks per input as the recipe
   does; its update costs more, as the teacher also encodes the mixtures).
3. Linear probe (`train_linear_probe`) on frozen features (`Recipe.probe_input`: by default the
   last block's CLS token and every block's mean-pooled patch tokens, concatenated; docs/demo_recipe.md):
   single-label accuracy on the monophonic test clips, mAP on the polyphonic test scenes. Floors
   and yardsticks: a randomly initialised encoder of the same shape, and hand-made features
   (log-mel mean and standard deviation per band) with the same probe; chance is printed.
4. Bootstrap over seeds and test clips (`intervals`): every score's mean and 95 % interval, and
   whether each difference is resolved. Print the table (and a warning when a pretrained model
   scores below random init); write results.json, then demo.png.

The numbers are whatever this run gives: nothing is tuned for stage 2 to win (docs/demo_recipe.md).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .. import data as _data
from ..config import SSLAMConfig
from ..data import audio as _audio
from ..model import Encoder
from .benchmark import INSTRUMENT_PHRASES, SPLITS, build_benchmark, instruments_available
from .intervals import bootstrap_replicates, interval
from .metrics import accuracy, mean_average_precision
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
    updates: int  # per continuation (stage 1 continued, stage 2)
    seeds: int
    mix: tuple  # (window, w1_max, w2_max) in frames, the recipe's 240/496/782 of 1024 scaled
    start_updates: Optional[int] = None  # the shared stage-1 start; None: `updates`
    phrases_per_program: int = INSTRUMENT_PHRASES  # the instruments benchmark's recordings per GM program

    @property
    def start(self) -> int:
        return self.updates if self.start_updates is None else self.start_updates


FULL = DemoSize(4.0, 400, 48, 24, 480, 240, 300, 3, (96, 192, 304), start_updates=1500, phrases_per_program=8)
QUICK = DemoSize(2.0, 192, 4, 2, 40, 20, 20, 2, (48, 80, 144))


@dataclass(frozen=True)
class Recipe:
    """The small-scale recipe (docs/demo_recipe.md: what was tried and what each gave)."""

    model: Dict[str, Any] = field(default_factory=lambda: {
        "embed_dim": 64, "depth": 4, "num_heads": 4, "decoder_layers": 2, "decoder_groups": 16,
        "average_top_k_layers": 4, "attention": "sdpa", "ema_decay": 0.9998, "ema_end_decay": 0.99999})  # the released EMA
    clone_batch: int = 4  # masked views per clip in stage 1 (stage 2: half)
    batch: int = 8
    peak_lr: float = 1e-3
    warmup_fraction: float = 0.1
    probe_input: str = "cls_layers"  # one of PROBE_INPUTS (`embed`)
    probe_top_layers: int = 2
    probe_epochs: int = 100
    probe_lr: float = 1e-3


RECIPE = Recipe()
PROBE_INPUTS = ("cls", "mean", "top_mean", "cls_mean", "cls_layers")
REPLICATES = 2000
MODELS = ("log-mel mean+std", "random init", "stage 1 (EAT)", "stage 1 + 2 (SSLAM)")
PRETRAINED = ("stage 1 (EAT)", "stage 1 + 2 (SSLAM)")
TASKS = {"mono_accuracy": "monophonic accuracy %", "poly_mAP": "polyphonic mAP %"}
DIFFERENCES = (("stage 1 (EAT)", "random init"), ("stage 1 + 2 (SSLAM)", "random init"),
               ("stage 1 + 2 (SSLAM)", "stage 1 (EAT)"))


def _pretrain(run_dir: str, manifest: str, size: DemoSize, recipe: Recipe, norm: tuple, stage: int, lr: float,
              seed: int, init_from: str = "", precision: str = "fp32", updates: Optional[int] = None,
              checkpoint_every: int = 0) -> Dict[str, Any]:
    """One pretraining run of `updates` updates (default `size.updates`); its last checkpoint is
    kept, or with `checkpoint_every` one every that many updates (the recipe studies' curves)."""
    from .. import train

    updates = updates or size.updates
    model = dict(recipe.model, stage=stage, clone_batch=recipe.clone_batch if stage == 1 else max(1, recipe.clone_batch // 2),
                 ema_anneal_end_step=updates, mix_window=size.mix[0], mix_w1_max=size.mix[1], mix_w2_max=size.mix[2])
    values = [f"model.{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in model.items()] + [
        f"data.manifest={manifest}", f"data.target_length={size.target_length}", f"data.norm_mean={norm[0]}",
        f"data.norm_std={norm[1]}", "data.backend=torch", "data.num_workers=1",
        f"train.global_batch={recipe.batch}", f"train.max_micro_batch={recipe.batch}", f"train.max_steps={updates}",
        f"train.precision={precision}", f"train.seed={seed}", f"train.collapse_after={updates}",
        f"optim.lr={lr}", f"optim.warmup_steps={max(1, int(updates * recipe.warmup_fraction))}",
        f"optim.cosine_steps={updates}",
        f"checkpoint.dir={run_dir}", f"checkpoint.every_steps={checkpoint_every or updates}",
        f"checkpoint.keep_last={-(-updates // checkpoint_every) if checkpoint_every else 1}",
        f"logging.every_steps={max(1, updates // 60)}", "logging.progress_bar=false",
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
    return {"dir": run_dir, "stage": stage, "updates": updates, "peak_lr": lr, "seed": seed,
            "seconds": time.perf_counter() - start, "checkpoint": os.path.join(run_dir, f"step_{updates:09d}"),
            "curve": {"step": [line["step"] for line in lines], "loss": [line["loss"] for line in lines]}}


def embed(encoder: Encoder, fbank: torch.Tensor, probe_input: str, top_layers: int) -> torch.Tensor:
    """[B, 1, T, F] fbank -> probe features: the CLS token ("cls", [B, D]), the last block's patch
    tokens mean-pooled ("mean", [B, D]), both concatenated ("cls_mean", [B, 2D]), the mean-pooled
    patch tokens of each of the top `top_layers` blocks, averaged ("top_mean", [B, D]), or the CLS
    token and every block's mean-pooled patch tokens, concatenated ("cls_layers", [B, (1 + depth) D])."""
    if probe_input in ("cls", "mean", "cls_mean"):
        x = encoder.extract_features(fbank, granularity="all")
        cls, mean = x[:, 0], x[:, 1:].mean(dim=1)
        return cls if probe_input == "cls" else mean if probe_input == "mean" else torch.cat([cls, mean], dim=1)
    if probe_input not in ("top_mean", "cls_layers"):
        raise ValueError(f"probe_input must be one of {PROBE_INPUTS}, got {probe_input!r}")
    blocks = block_tokens(encoder, fbank)
    pooled = [x[:, 1:].mean(dim=1) for x in blocks]
    if probe_input == "cls_layers":
        return torch.cat([blocks[-1][:, 0], *pooled], dim=1)
    return torch.stack(pooled[-top_layers:]).mean(dim=0)


def block_tokens(encoder: Encoder, fbank: torch.Tensor) -> List[torch.Tensor]:
    """Every block's output tokens [B, 1 + P, D] (CLS first), first block first: one pass."""
    x = encoder.norm(encoder.tokens(fbank))
    out = []
    for block in encoder.blocks:
        x, _ = block(x)
        out.append(x)
    return out


def logmel_features(fbank: torch.Tensor) -> torch.Tensor:
    """The hand-made baseline: [B, 1, T, F] (normalised) log-mel -> [B, 2F], each band's mean and
    standard deviation over time."""
    x = fbank[:, 0]
    return torch.cat([x.mean(dim=1), x.std(dim=1, unbiased=False)], dim=1)


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


def prepare_benchmark(out_dir: str, runs_dir: str, size: DemoSize, seed: int, source: str):
    """Build the benchmark at `size` under out_dir/benchmark from `seed`, write runs_dir/pretrain.tsv
    (its mono and poly training clips, without labels: what pretraining reads) and measure its fbank
    normalisation. Returns (benchmark, pretraining manifest path, (mean, std) rounded to 4 decimals,
    split -> (normalised fbank [clips, 1, T, F], 0/1 targets [clips, classes]))."""
    bench = build_benchmark(os.path.join(out_dir, "benchmark"), seed=seed, clip_seconds=size.clip_seconds,
                            train_clips_per_class=size.train_clips_per_class, test_clips_per_class=size.test_clips_per_class,
                            train_scenes=size.train_scenes, test_scenes=size.test_scenes, source=source,
                            phrases_per_program=size.phrases_per_program)
    first, second = (_data.read_manifest(bench.manifests[s]) for s in ("mono_train", "poly_train"))
    manifest = os.path.join(runs_dir, "pretrain.tsv")
    _data.Manifest(manifest, bench.root, first.paths + second.paths, first.sizes + second.sizes).write(manifest)
    mean, std, _ = _data.norm_stats(manifest, size.target_length)
    norm = (round(mean, 4), round(std, 4))
    return bench, manifest, norm, {split: _load_split(bench, split, size, norm) for split in SPLITS}


def _plot(results: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), dpi=80, gridspec_kw={"width_ratios": [1.2, 1, 1]})
    runs = results["pretraining"]["runs"][0]
    half = runs["start"]["updates"]
    for key, label, color in (("start", "stage 1, shared start", "tab:grey"), ("stage1", "stage 1 continued", "tab:blue"),
                              ("sslam", "stage 2 (SSLAM objective)", "tab:red")):
        curve = runs[key]["curve"]
        offset = 0 if key == "start" else half
        axes[0].plot([offset + s for s in curve["step"]], np.array(curve["loss"]) / curve["loss"][0], label=label, color=color)
    axes[0].axvline(half, color="grey", linewidth=0.8)
    axes[0].set_xlabel("update")
    axes[0].set_ylabel("loss / its value at the run's first update")
    axes[0].set_title(f"pretraining (seed {results['seeds'][0]}), each objective normalised", fontsize=10)
    axes[0].legend(fontsize=8)
    colors = {"log-mel mean+std": "tab:olive", "random init": "tab:grey", "stage 1 (EAT)": "tab:blue",
              "stage 1 + 2 (SSLAM)": "tab:red"}
    for ax, (task, title) in zip(axes[1:], TASKS.items()):
        means = [results["scores"][m][task]["mean"] for m in MODELS]
        lows = [results["scores"][m][task]["low"] for m in MODELS]
        highs = [results["scores"][m][task]["high"] for m in MODELS]
        for i, name in enumerate(MODELS):  # points, not bars: the axis does not start at zero
            ax.errorbar(i, means[i], yerr=[[means[i] - lows[i]], [highs[i] - means[i]]], fmt="o", capsize=5,
                        color=colors[name], markersize=7)
            ax.annotate(f"{means[i]:.1f}", (i, means[i]), textcoords="offset points", xytext=(8, -3), fontsize=8)
        chance = results["chance"][task]
        ax.axhline(chance, color="black", linestyle="--", linewidth=1)
        ax.text(-0.45, chance, f"chance {chance:.1f}", va="bottom", ha="left", fontsize=8)
        bottom, top = min(min(lows), chance), max(highs)
        ax.set_ylim(bottom - 0.08 * (top - bottom), top + 0.08 * (top - bottom))
        ax.set_xlim(-0.5, len(MODELS) - 0.5)
        ax.set_xticks(range(len(MODELS)), ["log-mel\nmean+std", "random\ninit", "stage 1\n(EAT)", "stage 1 + 2\n(SSLAM)"],
                      fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(title + ", 95 % interval", fontsize=10)
    bench = results["benchmark"]
    fig.text(0.5, 0.01, f"Linear probes on frozen features, {len(results['seeds'])} seeds; {len(bench['classes'])} classes "
             f"({bench['source']}), {bench['clips']['mono_test']} + {bench['clips']['poly_test']} test clips; "
             f"points: mean over seeds, whiskers: bootstrap 95 % interval over seeds and test clips. sslam-fast demo, {results['date']}",
             ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def _cell(score: Dict[str, float]) -> str:
    return f"{score['mean']:5.1f} [{score['low']:5.1f}, {score['high']:5.1f}]"


def format_table(results: Dict[str, Any]) -> str:
    rows = [("model", "features", *TASKS.values())]
    for name in MODELS:
        s = results["scores"][name]
        rows.append((name, s["features"], *(_cell(s[task]) for task in TASKS)))
    rows.append(("chance", "", *(f"{results['chance'][task]:5.1f}" for task in TASKS)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for d in results["differences"]:
        lines.append(f"{d['a']} - {d['b']}: " + "; ".join(
            f"{TASKS[task].split()[0]} {_signed(d[task])} ({'resolved' if d[task]['resolved'] else 'not resolved'})"
            for task in TASKS))
    return "\n".join(lines)


def _signed(score: Dict[str, float]) -> str:
    return f"{score['mean']:+.1f} [{score['low']:+.1f}, {score['high']:+.1f}]"


def below_random_warnings(results: Dict[str, Any]) -> List[str]:
    """One line per pretrained model and task where its mean score is below random init's."""
    floor = results["scores"]["random init"]
    return [f"WARNING: {name} scores below random init on {TASKS[task]}: {results['scores'][name][task]['mean']:.1f} vs "
            f"{floor[task]['mean']:.1f} (pretraining did not help this representation here)"
            for name in PRETRAINED for task in TASKS if results["scores"][name][task]["mean"] < floor[task]["mean"]]


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


def _versions() -> Dict[str, str]:
    from importlib import metadata

    try:
        sslam_version = metadata.version("sslam-fast")
    except metadata.PackageNotFoundError:
        sslam_version = "not installed (run from a checkout)"
    out = {"sslam_fast": sslam_version, "python": platform.python_version(), "torch": torch.__version__,
           "numpy": np.__version__}
    if shutil.which("fluidsynth"):
        done = subprocess.run(["fluidsynth", "--version"], capture_output=True, text=True)
        out["fluidsynth"] = done.stdout.splitlines()[0] if done.returncode == 0 and done.stdout else "unknown"
    return out


def _machine() -> Dict[str, Any]:
    from ..released.inference import cpu_info

    info = cpu_info()
    cpu = info.model if info.model != "unknown CPU" else platform.processor() or platform.machine()
    return {"platform": platform.platform(), "cpu": cpu, "cpu_bf16": info.bf16_flag, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": "cpu"}


def _probe_scores(features: Dict[str, torch.Tensor], splits, num_classes: int, seed: int, recipe: Recipe):
    """(mono accuracy %, poly mAP %, mono test softmax scores, poly test sigmoid scores)."""
    kw = dict(seed=seed, epochs=recipe.probe_epochs, lr=recipe.probe_lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the probe's ops are tiny: intra-op threads only wait for each other (10x on a busy CPU)
    try:
        mono = train_linear_probe(features["mono_train"], splits["mono_train"][1].argmax(1), features["mono_test"],
                                  splits["mono_test"][1].argmax(1), task="multiclass", num_classes=num_classes, **kw)
        poly = train_linear_probe(features["poly_train"], splits["poly_train"][1], features["poly_test"],
                                  splits["poly_test"][1], task="multilabel", **kw)
    finally:
        torch.set_num_threads(threads)
    return 100 * mono.final_metric, 100 * poly.final_metric, mono.scores.numpy(), poly.scores.numpy()


def run_demo(out_dir: str, quick: bool = False, seed: int = 0, size: Optional[DemoSize] = None,
             recipe: Recipe = RECIPE, source: str = "", precision: str = "fp32") -> Dict[str, Any]:
    """The demo (module docstring) at `size` (FULL, or QUICK with `quick`) with `recipe`; seeds
    seed, seed + 1, ...; `source` picks the benchmark (default: instruments when fluidsynth and a
    soundfont are installed, else "auto"); `precision` "bf16" pretrains under CPU bf16 autocast
    (fp32 masters), fp32 otherwise. Returns what results.json holds."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    check_needs()
    size = size or (QUICK if quick else FULL)
    source = source or ("instruments" if instruments_available() else "auto")
    seeds = [seed + i for i in range(size.seeds)]
    seconds: Dict[str, float] = {}
    clock = time.perf_counter()
    out_dir = os.path.abspath(out_dir)
    runs_dir = os.path.join(out_dir, "runs")
    shutil.rmtree(runs_dir, ignore_errors=True)  # the demo's own pretraining runs: start afresh
    os.makedirs(runs_dir)

    bench, manifest, norm, splits = prepare_benchmark(out_dir, runs_dir, size, seed, source)
    seconds["benchmark"], clock = time.perf_counter() - clock, time.perf_counter()

    from ..released.formats import load_pretrainer

    runs, per_seed = [], {name: [] for name in MODELS}
    predictions = {task: {name: [] for name in MODELS} for task in TASKS}
    for s in seeds:
        def run(name: str, stage: int, lr: float, init_from: str = "", updates: Optional[int] = None) -> Dict[str, Any]:
            return _pretrain(os.path.join(runs_dir, f"seed{s}", name), manifest, size, recipe, norm, stage, lr, s, init_from,
                             precision, updates)

        start = run("start", 1, recipe.peak_lr, updates=size.start)
        seed_runs = {"start": start, "stage1": run("stage1", 1, recipe.peak_lr / 10, start["checkpoint"]),
                     "sslam": run("sslam", 2, recipe.peak_lr / 10, start["checkpoint"])}
        runs.append(seed_runs)
        seconds[f"pretraining seed {s}"], clock = time.perf_counter() - clock, time.perf_counter()

        torch.manual_seed(s)
        encoders = {"random init": Encoder(SSLAMConfig(**dict(recipe.model, clone_batch=recipe.clone_batch))),
                    "stage 1 (EAT)": load_pretrainer(os.path.join(seed_runs["stage1"]["checkpoint"], "train.pt")).student,
                    "stage 1 + 2 (SSLAM)": load_pretrainer(os.path.join(seed_runs["sslam"]["checkpoint"], "train.pt")).student}
        for name in MODELS:
            if name == "log-mel mean+std":
                feats = {split: logmel_features(clips) for split, (clips, _) in splits.items()}
            else:
                encoder = encoders[name]
                feats = {split: compute_features(lambda x: embed(encoder, x, recipe.probe_input, recipe.probe_top_layers),
                                                 clips, batch_size=32) for split, (clips, _) in splits.items()}
            mono, poly, mono_scores, poly_scores = _probe_scores(feats, splits, len(bench.classes), s, recipe)
            per_seed[name].append({"seed": s, "mono_accuracy": mono, "poly_mAP": poly})
            predictions["mono_accuracy"][name].append(mono_scores)
            predictions["poly_mAP"][name].append(poly_scores)
        seconds[f"probes seed {s}"], clock = time.perf_counter() - clock, time.perf_counter()

    metrics = {"mono_accuracy": (lambda p, t: 100 * accuracy(p, t), splits["mono_test"][1].argmax(1).numpy()),
               "poly_mAP": (lambda p, t: 100 * mean_average_precision(p, t), splits["poly_test"][1].numpy())}
    replicates = {task: bootstrap_replicates(metric, predictions[task], targets, REPLICATES, seed=seed)
                  for task, (metric, targets) in metrics.items()}
    features = {"log-mel mean+std": "hand-made, no pretraining", "random init": f"{recipe.probe_input}, no pretraining",
                "stage 1 (EAT)": f"{recipe.probe_input}, stage 1: {size.start + size.updates}",
                "stage 1 + 2 (SSLAM)": f"{recipe.probe_input}, stage 1: {size.start} + 2: {size.updates}"}
    scores = {name: {"features": features[name], "per_seed": per_seed[name],
                     **{task: asdict(interval(np.mean([r[task] for r in per_seed[name]]), replicates[task][name]))
                        for task in TASKS}} for name in MODELS}
    differences = []
    for a, b in DIFFERENCES:
        d = {"a": a, "b": b}
        for task in TASKS:
            gap = interval(scores[a][task]["mean"] - scores[b][task]["mean"], replicates[task][a] - replicates[task][b])
            d[task] = dict(asdict(gap), resolved=gap.excludes(0.0))
        differences.append(d)
    seconds["bootstrap"] = time.perf_counter() - clock
    seconds["total"] = sum(seconds.values())

    poly_test = splits["poly_test"][1]
    results = {
        "quick": quick,
        "seeds": seeds,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "versions": _versions(),
        "machine": _machine(),
        "benchmark": {"root": bench.root, "source": bench.info.get("source", "recordings"), "synthesised": bench.synthesised,
                      "classes": bench.classes, "clip_seconds": size.clip_seconds,
                      "clips": {split: len(clips) for split, (clips, _) in splits.items()}},
        "chance": {"mono_accuracy": 100.0 / len(bench.classes),
                   # a random ranking's expected AP is the class's share of positive clips
                   "poly_mAP": float(100 * poly_test.mean(0)[poly_test.sum(0) > 0].mean())},
        "recipe": asdict(recipe),
        "pretraining": {"clips_per_update": recipe.batch, "start_updates": size.start, "updates_per_run": size.updates,
                        "precision": precision, "norm_mean": norm[0],
                        "norm_std": norm[1], "target_length": size.target_length, "runs": runs},
        "scores": scores,
        "differences": differences,
        "bootstrap": {"replicates": REPLICATES, "level": 0.95, "over": "seeds and test clips, paired across models"},
        "seconds": seconds,
        "png": os.path.join(out_dir, "demo.png"),
    }
    results["warnings"] = below_random_warnings(results)
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)  # before the plot: a failure there loses no result
    _plot(results, results["png"])
    return results


def summary(results: Dict[str, Any]) -> List[str]:
    b, s = results["benchmark"], results["seconds"]
    kind = {"instruments": "GM instrument families rendered by fluidsynth", "recordings": "real recordings"}.get(
        b["source"], "SYNTHESISED fallback")
    pre = results["pretraining"]
    return [
        f"benchmark: {len(b['classes'])} classes ({kind}), {b['clip_seconds']:g} s clips, "
        + ", ".join(f"{k} {v}" for k, v in b["clips"].items()),
        f"pretraining, per seed ({', '.join(map(str, results['seeds']))}): stage 1 for {pre.get('start_updates', pre['updates_per_run'])} "
        f"updates of {pre['clips_per_update']} clips, then {pre['updates_per_run']} more of stage 1 or of stage 2",
        "",
        format_table(results),
        "",
        *results["warnings"],
        f"time: benchmark {s['benchmark']:.0f} s, pretraining {sum(v for k, v in s.items() if k.startswith('pretraining')):.0f} s, "
        f"probes {sum(v for k, v in s.items() if k.startswith('probes')):.0f} s, total {s['total']:.0f} s "
        f"({results['machine']['cpus']} CPUs, {results['date']})",
        f"wrote {os.path.join(os.path.dirname(results['png']), 'results.json')} and {results['png']}",
    ]
