"""The demo recipe's third and fourth studies (docs/demo_recipe.md): variants of the stage-1 start,
several seeds each, on the demo's full-size benchmark, each compared with the random-init encoder of
the same shape and seed by a paired bootstrap over seeds and test clips (the demo's intervals).

    python benchmarks/demo_screen.py OUT_DIR VARIANT [VARIANT ...] [--seeds 3,4,5]
        [--benchmark-seed 3] [--updates N] [--every K] [--phrases N] [--target-length T]
        [--teacher] [--logreg]

For each variant and seed: one stage-1 run from scratch (`demo._pretrain`, the demo's schedule and
EMA anneal over the run; no continuation), then the linear probes of `sslam-fast demo` on every
probe input of `inputs` for the student (and with --teacher the EMA teacher) of each checkpoint
(every K updates with --every, else the last) and for random init. --logreg adds a converged,
L2-regularised logistic regression (scikit-learn, C = 0.1) beside the demo's probe. The benchmark
is the demo's (`demo.FULL`; --phrases: with that many phrases per GM program), built from
--benchmark-seed as the demo builds it from its first seed;
pretraining never sees a test clip. Appends one JSON line per probed encoder to
OUT_DIR/screen.jsonl and prints, per variant, checkpoint, encoder and input, the difference to
random init with its 95 % interval.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shutil

import numpy as np
import torch

from sslam_fast.evaluation import demo
from sslam_fast.evaluation.benchmark import SPLITS
from sslam_fast.evaluation.intervals import bootstrap_replicates, interval
from sslam_fast.evaluation.metrics import accuracy, mean_average_precision
from sslam_fast.released.formats import load_pretrainer

M = demo.RECIPE.model
# name: (recipe changes, model changes, stage-1 updates[, input scale]): about the demo's start's time each
VARIANTS = {
    "base": ({}, {}, 1500),  # the demo's stage-1 start
    "batch16_views2": ({"batch": 16, "clone_batch": 2}, {}, 1500),  # 2x the clips, the same student views
    "batch16": ({"batch": 16}, {}, 1200),  # 2x the clips and views per update, 1.26x the time per update
    "width128": ({}, {"embed_dim": 128}, 900),  # 1.7x the time per update
    "mask0.6": ({}, {"mask_prob": 0.6}, 1500),
    "depth2": ({}, {"depth": 2, "average_top_k_layers": 2}, 1900),  # targets: every block, as in the demo
    "depth6": ({}, {"depth": 6, "average_top_k_layers": 6}, 1200),
    # the normalised fbank times 2 / 4 (data.norm_std divided by it), for the encoder and its random init alike
    "input_x2": ({}, {}, 1500, 2.0),
    "input_x4": ({}, {}, 1500, 4.0),
    # teachers: the demo's EMA until the fourth study, the first study's slow one, a frozen random teacher
    # (the demo's own since the fourth study is the released recipe's, 0.9998 -> 0.99999: configs/as2m.json)
    "ema_fast": ({}, {"ema_decay": 0.99, "ema_end_decay": 0.999}, 1500),
    "ema_slow": ({}, {"ema_decay": 0.999, "ema_end_decay": 0.9999}, 1500),
    "ema_frozen": ({}, {"ema_decay": 1.0, "ema_end_decay": 1.0}, 1500),
}


def inputs(encoder, fbank: torch.Tensor) -> dict:
    """Every probe input from one pass: the demo's CLS + mean ("cls_mean"), with the patch tokens'
    standard deviation over the clip ("cls_mean_std") or max ("cls_max"), and CLS with every block's
    mean-pooled patch tokens ("cls_layers", `demo.embed`'s) plus their max ("cls_layers_max")."""
    blocks = demo.block_tokens(encoder, fbank)
    layers = [x[:, 1:] for x in blocks]
    cls, last = blocks[-1][:, 0], layers[-1]
    return {"cls_mean": torch.cat([cls, last.mean(1)], 1), "cls_mean_std": torch.cat([cls, last.mean(1), last.std(1)], 1),
            "cls_max": torch.cat([cls, last.amax(1)], 1), "cls_layers": torch.cat([cls] + [p.mean(1) for p in layers], 1),
            "cls_layers_max": torch.cat([cls] + [p.mean(1) for p in layers] + [p.amax(1) for p in layers], 1)}


def logreg(features, splits, c: float = 0.1):
    """A converged L2 logistic regression on standardised features: (mono scores, poly scores)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    out = []
    for task in ("mono", "poly"):
        scaler = StandardScaler().fit(features[f"{task}_train"])
        xtr, xte = scaler.transform(features[f"{task}_train"]), scaler.transform(features[f"{task}_test"])
        y = splits[f"{task}_train"][1].numpy()
        if task == "mono":
            out.append(LogisticRegression(C=c, max_iter=3000).fit(xtr, y.argmax(1)).predict_proba(xte))
        else:
            out.append(np.stack([LogisticRegression(C=c, max_iter=3000).fit(xtr, y[:, k]).decision_function(xte)
                                 if 0 < y[:, k].sum() < len(y) else np.zeros(len(xte)) for k in range(y.shape[1])], 1))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("variants", nargs="+", choices=sorted(VARIANTS))
    p.add_argument("--seeds", default="3,4,5")
    p.add_argument("--benchmark-seed", type=int, default=None, help="default: the first seed, as the demo does")
    p.add_argument("--updates", type=int, default=0, help="stage-1 updates instead of the variant's")
    p.add_argument("--every", type=int, default=0, help="also probe a checkpoint every this many updates")
    p.add_argument("--phrases", type=int, default=0, help="the benchmark's phrases per GM program instead of the demo's")
    p.add_argument("--target-length", type=int, default=0, help="fbank frames per clip instead of the demo's")
    p.add_argument("--teacher", action="store_true", help="probe the EMA teacher too")
    p.add_argument("--logreg", action="store_true", help="also a converged logistic-regression probe (scikit-learn)")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    size = dataclasses.replace(demo.FULL, **{k: v for k, v in (("phrases_per_program", args.phrases),
                                                                ("target_length", args.target_length)) if v})
    bench, manifest, norm, splits = demo.prepare_benchmark(
        args.out, args.out, size, seeds[0] if args.benchmark_seed is None else args.benchmark_seed, "instruments")
    targets = {"mono_accuracy": splits["mono_test"][1].argmax(1).numpy(), "poly_mAP": splits["poly_test"][1].numpy()}
    metrics = {"mono_accuracy": lambda p, t: 100 * accuracy(p, t), "poly_mAP": lambda p, t: 100 * mean_average_precision(p, t)}
    probes = ("demo", "logreg") if args.logreg else ("demo",)
    predictions = {}  # (variant, checkpoint, encoder, input, probe) -> task -> per-seed test scores

    def probe(rows, encoder, seed: int, meta: dict, scale: float) -> None:
        encoder.eval()
        with torch.inference_mode():
            outs = {s: [inputs(encoder, c * scale) for c in clips.split(32)] for s, (clips, _) in splits.items()}
        feats = {s: {k: torch.cat([o[k] for o in out]) for k in out[0]} for s, out in outs.items()}
        scores = {}
        for key in feats["mono_train"]:
            one = {s: feats[s][key] for s in SPLITS}
            for name in probes:
                if name == "demo":
                    _, _, mono, poly = demo._probe_scores(one, splits, len(bench.classes), seed, demo.RECIPE)
                else:
                    mono, poly = logreg({s: v.numpy() for s, v in one.items()}, splits)
                got = dict(zip(metrics, (mono, poly)))
                for task, pred in got.items():
                    rows.setdefault((key, name), {}).setdefault(task, []).append(pred)
                scores[f"{key}/{name}"] = [round(metrics[t](got[t], targets[t]), 1) for t in metrics]
        line = dict(meta, seed=seed, scores=scores)
        print(json.dumps(line), flush=True)
        with open(os.path.join(args.out, "screen.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    randoms = {}
    for variant in args.variants:
        recipe_changes, model_changes, updates, *scale = VARIANTS[variant]
        scale = scale[0] if scale else 1.0
        recipe = dataclasses.replace(demo.RECIPE, model=dict(M, **model_changes), **recipe_changes)
        updates = args.updates or updates
        shape = recipe.model["embed_dim"], recipe.model["depth"], scale
        for seed in seeds:
            if (shape, seed) not in randoms:
                torch.manual_seed(seed)  # as the demo draws its random-init encoder
                randoms[shape, seed] = {}
                probe(randoms[shape, seed], demo.Encoder(demo.SSLAMConfig(**dict(recipe.model, clone_batch=recipe.clone_batch))),
                      seed, {"variant": variant, "encoder": "random init", "shape": list(shape)}, scale)
            run_dir = os.path.join(args.out, "runs", f"{variant}_{updates}_seed{seed}")
            shutil.rmtree(run_dir, ignore_errors=True)
            run = demo._pretrain(run_dir, manifest, size, recipe, (norm[0], norm[1] / scale), 1, recipe.peak_lr, seed,
                                 updates=updates, checkpoint_every=args.every)
            for checkpoint in sorted(glob.glob(os.path.join(run_dir, "step_*"))):
                step = int(checkpoint.rsplit("_", 1)[1])
                model = load_pretrainer(os.path.join(checkpoint, "train.pt"))
                for name in ("student", "teacher") if args.teacher else ("student",):
                    rows = predictions.setdefault((variant, step, name, shape), {})
                    probe(rows, getattr(model, name), seed, {"variant": variant, "updates": updates, "checkpoint": step,
                                                              "encoder": name, "pretraining_s": round(run["seconds"], 1)}, scale)

    print(f"\npretrained - random init of the same shape, mean over seeds {seeds} [95 % interval], * resolved")
    for (variant, step, name, shape), rows in predictions.items():
        for (key, probe_name), by_task in rows.items():
            floor = {task: [randoms[shape, s][key, probe_name][task][0] for s in seeds] for task in metrics}
            cells = []
            for task, metric in metrics.items():
                rep = bootstrap_replicates(metric, {"a": by_task[task], "b": floor[task]}, targets[task], demo.REPLICATES, seed=0)
                a = np.mean([metric(p, targets[task]) for p in by_task[task]])
                b = np.mean([metric(p, targets[task]) for p in floor[task]])
                gap = interval(a - b, rep["a"] - rep["b"])
                cells.append(f"{a:.1f} vs {b:.1f}: {gap.mean:+.1f} [{gap.low:+.1f}, {gap.high:+.1f}]{' *' if gap.excludes(0.0) else ''}")
            print(f"{variant} @{step} {name} {key} ({probe_name}): " + " | ".join(cells))


if __name__ == "__main__":
    main()
