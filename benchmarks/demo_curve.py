"""The demo's learning curves (docs/demo_recipe.md, second table): one stage-1 run of the demo's
model on the demo's benchmark, checkpointed along the way, with an optional continuation at a tenth
of the peak LR (as the demo's "stage 1 (EAT)" row); random init and every checkpoint are probed on
every probe input, the demo's (`demo.PROBE_INPUTS`) and three that keep the frequency axis.

    python benchmarks/demo_curve.py OUT_DIR --updates 2000 --every 250 [--continue 300] [--seed 5]
        [--lr 1e-3] [--clips-per-class 12 --scenes 120 --test-clips-per-class 6 --test-scenes 60]

The benchmark is built with seed 0, as `sslam-fast demo` builds it; pretraining uses all its
training clips (mono and poly, without labels), never a test clip. Appends one JSON line per
probed encoder to OUT_DIR/curve.jsonl: (monophonic accuracy %, polyphonic mAP %) per probe input.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shutil
import time

import torch

from sslam_fast.evaluation import demo
from sslam_fast.evaluation.benchmark import SPLITS
from sslam_fast.released.formats import load_pretrainer


def probe_inputs(encoder, fbank: torch.Tensor, freq_patches: int) -> dict:
    """Every probe input from one pass: the demo's, and the patch tokens pooled over time per
    frequency row, rows concatenated ("freq_rows", [B, F*D]; "freq_rows_top2": the top 2 blocks
    averaged first; "freq_rows_meanstd": per-row mean and standard deviation)."""
    layers = demo.block_tokens(encoder, fbank)
    b, last = fbank.shape[0], layers[-1]
    cls, patches = last[:, 0], last[:, 1:]
    top2 = torch.stack([layer[:, 1:] for layer in layers[-2:]]).mean(dim=0)
    grid = lambda p: p.reshape(b, -1, freq_patches, p.shape[-1])  # noqa: E731  time-major patches
    return {"cls": cls, "mean": patches.mean(dim=1), "top_mean": top2.mean(dim=1),
            "cls_mean": torch.cat([cls, patches.mean(dim=1)], dim=1),
            "freq_rows": grid(patches).mean(dim=1).reshape(b, -1), "freq_rows_top2": grid(top2).mean(dim=1).reshape(b, -1),
            "freq_rows_meanstd": torch.cat([grid(patches).mean(dim=1).reshape(b, -1), grid(patches).std(dim=1).reshape(b, -1)], 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("--updates", type=int, required=True, help="stage-1 updates from scratch (one cosine schedule)")
    p.add_argument("--every", type=int, default=0, help="checkpoint (and probe) every this many updates; 0: at the end")
    p.add_argument("--continue", dest="cont", type=int, default=0, help="then this many updates at a tenth of the LR")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--lr", type=float, default=demo.RECIPE.peak_lr)
    p.add_argument("--clips-per-class", type=int, default=demo.FULL.train_clips_per_class)
    p.add_argument("--scenes", type=int, default=demo.FULL.train_scenes)
    p.add_argument("--test-clips-per-class", type=int, default=demo.FULL.test_clips_per_class)
    p.add_argument("--test-scenes", type=int, default=demo.FULL.test_scenes)
    args = p.parse_args()
    recipe = dataclasses.replace(demo.RECIPE, peak_lr=args.lr)
    size = dataclasses.replace(demo.FULL, train_clips_per_class=args.clips_per_class, train_scenes=args.scenes,
                               test_clips_per_class=args.test_clips_per_class, test_scenes=args.test_scenes)
    os.makedirs(args.out, exist_ok=True)
    clock = time.perf_counter()
    bench, manifest, norm, splits = demo.prepare_benchmark(args.out, args.out, size, 0, "instruments")
    print(f"benchmark {time.perf_counter() - clock:.0f} s", flush=True)

    run_dir = os.path.join(args.out, "run")
    shutil.rmtree(run_dir, ignore_errors=True)
    start = demo._pretrain(run_dir, manifest, size, recipe, norm, 1, recipe.peak_lr, args.seed, updates=args.updates,
                           checkpoint_every=args.every)
    seconds = start["seconds"]
    encoders = {os.path.basename(c): c for c in sorted(glob.glob(os.path.join(run_dir, "step_*")))}
    if args.cont:
        cont_dir = os.path.join(args.out, "continued")
        shutil.rmtree(cont_dir, ignore_errors=True)
        cont = demo._pretrain(cont_dir, manifest, size, recipe, norm, 1, recipe.peak_lr / 10, args.seed, start["checkpoint"],
                              updates=args.cont)
        encoders[f"{args.updates}+{args.cont}"] = cont["checkpoint"]
        seconds += cont["seconds"]
    print(f"pretraining {seconds:.0f} s", flush=True)

    torch.manual_seed(args.seed)
    models = {"random init": lambda: demo.Encoder(demo.SSLAMConfig(**dict(recipe.model, clone_batch=recipe.clone_batch)))}
    models.update({name: (lambda c=c: load_pretrainer(os.path.join(c, "train.pt")).student) for name, c in encoders.items()})
    for name, build in models.items():
        encoder = build().eval()
        with torch.inference_mode():
            outs = {s: [probe_inputs(encoder, c, encoder.cfg.freq_patches) for c in clips.split(32)] for s, (clips, _) in splits.items()}
        feats = {s: {k: torch.cat([o[k] for o in out]) for k in out[0]} for s, out in outs.items()}
        scores = {}
        for key in feats["mono_train"]:
            mono, poly, _, _ = demo._probe_scores({s: feats[s][key] for s in SPLITS}, splits, len(bench.classes), args.seed, recipe)
            scores[key] = [round(mono, 1), round(poly, 1)]
        line = {"encoder": name, "seed": args.seed, "lr": args.lr, "pretraining_s": round(seconds), "scores": scores}
        print(json.dumps(line), flush=True)
        with open(os.path.join(args.out, "curve.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
    logmel = {s: demo.logmel_features(clips) for s, (clips, _) in splits.items()}
    mono, poly, _, _ = demo._probe_scores(logmel, splits, len(bench.classes), args.seed, recipe)
    print(f"log-mel mean+std {mono:.1f} {poly:.1f}")


if __name__ == "__main__":
    main()
