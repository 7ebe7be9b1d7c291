"""The demo's recipe study (docs/demo_recipe.md): `sslam-fast demo` at its full size with one seed
per variant, each variant changing one thing of the first study's base (`BASE`, `BASE_SIZE`; "demo"
is `demo.RECIPE` at `demo.FULL`); every variant's students are then probed on each probe input
(`demo.PROBE_INPUTS`: CLS, last block mean-pooled, top blocks mean-pooled and averaged, CLS + mean).

    python benchmarks/demo_recipe.py OUT_DIR [VARIANT ...]    # default: every variant

Appends one JSON line per variant to OUT_DIR/study.jsonl (scores per model and probe input,
pretraining seconds, final losses).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import torch

from sslam_fast.evaluation import demo
from sslam_fast.released.formats import load_pretrainer

# The first study's base (its rows in docs/demo_recipe.md): 132 + 120 training clips, 200 updates per
# run (start and continuations), the top-2 mean probe input. The recipe's model, LR and EMA are the demo's.
BASE = dataclasses.replace(demo.RECIPE, probe_input="top_mean")
BASE_SIZE = demo.DemoSize(4.0, 400, 12, 6, 120, 60, 200, 3, (96, 192, 304))
SLOW_EMA = {"ema_decay": 0.999, "ema_end_decay": 0.9999}
FAST_EMA = {"ema_decay": 0.99, "ema_end_decay": 0.999}


def _model(**changes):
    return dict(BASE.model, **changes)


VARIANTS = {
    "base": (BASE, BASE_SIZE),
    "ema_slow": (dataclasses.replace(BASE, model=_model(**SLOW_EMA)), BASE_SIZE),
    "lr_5e-4": (dataclasses.replace(BASE, peak_lr=5e-4), BASE_SIZE),
    "lr_3e-3": (dataclasses.replace(BASE, peak_lr=3e-3), BASE_SIZE),
    "views_8": (dataclasses.replace(BASE, clone_batch=8), BASE_SIZE),
    "mask_0.6": (dataclasses.replace(BASE, model=_model(mask_prob=0.6)), BASE_SIZE),
    "updates_x2": (BASE, dataclasses.replace(BASE_SIZE, updates=2 * BASE_SIZE.updates)),
    "depth_2_dim_128": (dataclasses.replace(BASE, model=_model(depth=2, embed_dim=128, average_top_k_layers=2)), BASE_SIZE),
    # the second study (benchmarks/demo_curve.py for the learning curves): the demo's recipe now
    "demo": (demo.RECIPE, demo.FULL),
}


def run(out_dir: str, name: str) -> dict:
    recipe, size = VARIANTS[name]
    size = dataclasses.replace(size, seeds=1)
    results = demo.run_demo(os.path.join(out_dir, name), size=size, recipe=recipe)
    splits = {split: demo._load_split(_Bench(results["benchmark"]["root"]), split, size,
                                      (results["pretraining"]["norm_mean"], results["pretraining"]["norm_std"]))
              for split in ("mono_train", "mono_test", "poly_train", "poly_test")}
    runs = results["pretraining"]["runs"][0]
    seed = results["seeds"][0]
    torch.manual_seed(seed)
    encoders = {"random init": demo.Encoder(demo.SSLAMConfig(**dict(recipe.model, clone_batch=recipe.clone_batch))),
                "stage 1 (EAT)": load_pretrainer(os.path.join(runs["stage1"]["checkpoint"], "train.pt")).student,
                "stage 1 + 2 (SSLAM)": load_pretrainer(os.path.join(runs["sslam"]["checkpoint"], "train.pt")).student}
    scores = {}
    for probe_input in demo.PROBE_INPUTS:
        for model, encoder in encoders.items():
            feats = {split: demo.compute_features(lambda x: demo.embed(encoder, x, probe_input, recipe.probe_top_layers),
                                                  clips, batch_size=32) for split, (clips, _) in splits.items()}
            mono, poly, _, _ = demo._probe_scores(feats, splits, len(results["benchmark"]["classes"]), seed, recipe)
            scores[f"{model} / {probe_input}"] = {"mono_accuracy": round(mono, 1), "poly_mAP": round(poly, 1)}
    scores["log-mel mean+std"] = {task: round(results["scores"]["log-mel mean+std"][task]["mean"], 1) for task in demo.TASKS}
    return {"variant": name, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "recipe": dataclasses.asdict(recipe),
            "start_updates": size.start, "updates_per_run": size.updates,
            "pretraining_seconds": round(sum(r["seconds"] for r in runs.values()), 1),
            "final_loss": {k: round(r["curve"]["loss"][-1], 2) for k, r in runs.items()}, "scores": scores}


class _Bench:
    def __init__(self, root: str):
        self.root = root
        self.manifests = {s: os.path.join(root, f"{s}.tsv") for s in ("mono_train", "mono_test", "poly_train", "poly_test")}
        self.labels = {s: os.path.join(root, f"{s}.lbl") for s in self.manifests}
        self.descriptors = os.path.join(root, "label_descriptors.csv")


if __name__ == "__main__":
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    for variant in sys.argv[2:] or VARIANTS:
        with open(os.path.join(out, "study.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(run(out, variant)) + "\n")
