"""End-to-end pretraining step (forward, backward, optimizer, EMA): fast path vs reference path.

fast = SDPA / flash-attn + sslam_kernels (Triton on CUDA); reference = eager attention + the plain
PyTorch ops. On CUDA: ViT-B, 12 clips x 16 views (stage 1) or 12 x 8 x 2 (stage 2), 1024 frames,
bf16 autocast; reports clips/s and MFU from ``step_flops_per_clip``. On a CPU: a tiny model, as a
smoke run of the same code (its figures say nothing about GPU speed).
Set SSLAM_BENCH_JSON=path to write every figure as JSON.
"""
import json
import os

import pytest
import torch

from sslam_fast import SSLAMConfig, SSLAMPretrainer
from sslam_fast.implementation import set_implementation
from sslam_fast.pretrainer import step_flops_per_clip

CUDA = torch.cuda.is_available()
PEAK_BF16_FLOPS = 989e12  # H100 SXM dense bf16
RESULTS = {}


def make_step(stage: int, provider: str):
    fast = provider == "fast"
    common = dict(stage=stage, attention="auto" if fast else "eager")
    if CUDA:
        cfg = SSLAMConfig(clone_batch=16 if stage == 1 else 8, **common)
        batch, frames, device = 12, 1024, torch.device("cuda")
    else:
        cfg = SSLAMConfig(embed_dim=64, depth=2, num_heads=4, average_top_k_layers=2, decoder_layers=2,
                          clone_batch=2, **common)
        batch, frames, device = 2, 1024, torch.device("cpu")
    torch.manual_seed(0)
    model = set_implementation(SSLAMPretrainer(cfg), "fused" if fast else "reference").to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=CUDA)
    gen = torch.Generator(device=device).manual_seed(0)
    fbank = torch.randn(batch, 1, frames, 128, device=device, generator=gen) * 0.5
    updates = [0]

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=CUDA):
            out = model(fbank, generator=gen)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 4.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        updates[0] += 1
        model.update_teacher(updates[0])
        if CUDA:
            torch.cuda.synchronize()

    return step, cfg, batch, frames


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("provider", ["fast", "reference"])
def test_pretraining_step(benchmark, stage, provider):
    step, cfg, batch, frames = make_step(stage, provider)
    benchmark.pedantic(step, rounds=10 if CUDA else 3, warmup_rounds=3 if CUDA else 1, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: the step ran once, nothing to record
        return
    median = benchmark.stats.stats.median
    clips_per_s = batch / median
    info = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "clips_per_s": clips_per_s,
            "step_s_median": median, "batch": batch, "views": batch * cfg.clone_batch * (2 if stage == 2 else 1)}
    if CUDA:
        info["mfu"] = step_flops_per_clip(cfg, frames) * clips_per_s / PEAK_BF16_FLOPS
    benchmark.extra_info.update(info)
    RESULTS[f"stage{stage}_{provider}"] = info


@pytest.mark.parametrize("stage", [1, 2])
def test_fast_path_speedup(stage):
    fast, ref = RESULTS.get(f"stage{stage}_fast"), RESULTS.get(f"stage{stage}_reference")
    if fast is None or ref is None:
        pytest.skip("run the fast and reference entries in the same session")
    ratio = fast["clips_per_s"] / ref["clips_per_s"]
    RESULTS[f"stage{stage}_speedup"] = ratio
    if os.environ.get("SSLAM_BENCH_JSON"):
        with open(os.environ["SSLAM_BENCH_JSON"], "w") as f:
            json.dump(RESULTS, f, indent=2)
    if not CUDA:
        pytest.skip(f"CPU smoke run (fast/reference = {ratio:.2f}); the target applies on a GPU")
    assert ratio >= 1.2, f"fast/reference = {ratio:.2f}"
