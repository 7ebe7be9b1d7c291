"""Step overhead of ZeRO stages 0 / 1 / 2 / 3 on 2 CPU processes (gloo), for the trainer's choice
of ``deepspeed.zero_stage``.

The model is the parameter count of the ViT-B student + decoder (``SSLAM_BENCH_ZERO_PARAMS``,
default 88M) as a stack of square fp32 linear layers fed one row, so the forward and backward
compute is negligible and what is timed is what the stage costs: the gradient reduction, the AdamW
step on the rank's share, the parameter gathers, and the trainer's per-step gather of the fp32
masters for the EMA teacher (none at ZeRO-0, where every rank holds them). Memory per rank of
parameters, gradients and Adam state is the ZeRO paper's count (16 bytes per parameter in fp32,
divided as the stage divides it).

Opt-in, because a run at 88M parameters takes about 7 minutes on 2 cores: ``SSLAM_BENCH_ZERO=1 pytest
benchmarks/bench_zero.py -s``, or ``python benchmarks/bench_zero.py [params]`` (prints the table
of benchmarks/RESULTS.md: median of 5 steps after 2 warm-up steps; the total between barriers,
the phases as rank 0 sees them).
"""
import json
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = (0, 1, 2, 3)
WORKER = textwrap.dedent("""
    import json, os, sys, time
    import deepspeed, torch, torch.distributed as dist
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    import logging; logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    from sslam_fast.trainer.engine import MasterWeights
    stage, params, steps, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    width = 1024
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(max(1, params // (width * width + width)))])
    n = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
        "train_batch_size": dist.get_world_size(), "train_micro_batch_size_per_gpu": 1,
        "gradient_clipping": 4.0, "zero_optimization": {"stage": stage}, "steps_per_print": 2**62,
        "zero_allow_untested_optimizer": True})
    if stage == 3:
        parts = engine.optimizer.fp32_partitioned_groups_flat
        fulls = [torch.empty(p.numel() * dist.get_world_size()) for p in parts]
        def ema_source():
            for part, full in zip(parts, fulls):
                dist.all_gather(list(full.chunk(dist.get_world_size())), part)
    else:
        masters = MasterWeights(engine, list(engine.module.parameters()))
        ema_source = masters.gather
    x = torch.randn(1, width)
    phases = {"backward_s": [], "step_s": [], "ema_gather_s": [], "total_s": []}
    for i in range(steps + 2):
        dist.barrier()
        t0 = time.perf_counter()
        engine.backward(engine(x).square().mean())
        t1 = time.perf_counter()
        engine.step()
        t2 = time.perf_counter()
        ema_source()
        dist.barrier()
        t3 = time.perf_counter()
        for key, value in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
            phases[key].append(value)
    if dist.get_rank() == 0:
        median = lambda v: sorted(v[2:])[len(v[2:]) // 2]
        json.dump({"stage": stage, "params": n, **{k: median(v) for k, v in phases.items()}}, open(out, "w"))
""")


def bytes_per_rank(stage: int, params: int, world: int) -> float:
    """fp32 weights (4), gradients (4) and Adam moments (8) per parameter, as the stage shards them."""
    weights, grads, adam = 4.0, 4.0, 8.0
    if stage >= 1:
        adam /= world
    if stage >= 2:
        grads /= world
    if stage >= 3:
        weights /= world
    return params * (weights + grads + adam)


def measure(stage: int, params: int, steps: int = 5, world: int = 2) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        script, out = os.path.join(tmp, "worker.py"), os.path.join(tmp, "out.json")
        with open(script, "w") as f:
            f.write(WORKER)
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
        env["OMP_NUM_THREADS"] = "1"
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               str(world), script, str(stage), str(params), str(steps), out],
                              env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        with open(out) as f:
            result = json.load(f)
    result["gb_per_rank"] = bytes_per_rank(stage, result["params"], world) / 1e9
    return result


HEADER = ("| stage | params | forward + backward (ms) | engine.step (ms) | EMA master gather (ms) | total (ms) | "
          "weights+grads+Adam per rank (GB) |\n|---|---:|---:|---:|---:|---:|---:|")


def row(r: dict) -> str:
    ms = [f"{1000 * r[k]:.0f}" for k in ("backward_s", "step_s", "ema_gather_s", "total_s")]
    return f"| ZeRO-{r['stage']} | {r['params'] / 1e6:.1f}M | {' | '.join(ms)} | {r['gb_per_rank']:.2f} |"


@pytest.mark.skipif(os.environ.get("SSLAM_BENCH_ZERO") != "1", reason="opt-in (minutes): SSLAM_BENCH_ZERO=1")
def test_zero_stage_step_overhead():
    params = int(float(os.environ.get("SSLAM_BENCH_ZERO_PARAMS", 88e6)))
    results = [measure(stage, params) for stage in STAGES]
    for r in results:
        print(row(r))
    assert all(r["total_s"] > 0 for r in results)


if __name__ == "__main__":
    count = int(float(sys.argv[1])) if len(sys.argv) > 1 else 88_000_000
    print(HEADER, flush=True)
    for stage in STAGES:
        print(row(measure(stage, count)), flush=True)
