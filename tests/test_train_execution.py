"""How the trainer executes a step: train.execution / compile / cuda_graph, the optimizer it builds,
the metrics read one step late, the fp32 masters read in place, and the prefetcher's CUDA copies."""
import json
import logging
import os

import pytest
import torch

from sslam_fast.config import ConfigError
from sslam_fast.trainer.config import load_config
from sslam_fast.trainer.engine import deepspeed_config
from sslam_fast.trainer.optim import SkipNonFiniteAdamW, build_optimizer, plan_batch
from test_train import logged, patch_forward, run_in_process, trainer_in_process

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEMO = ["data.demo_clips=4"]


def train_section(*overrides):
    return load_config(None, DEMO + list(overrides)).train


def test_execution_sets_the_precision_and_the_implementation():
    fast = train_section()
    assert (fast.execution, fast.dtype, fast.model_implementation) == ("fast", "bf16", "fused")
    assert train_section("train.compile=true").model_implementation == "compiled"
    assert train_section("train.compile=true", "train.cuda_graph=true").cuda_graph
    original = train_section("train.execution=original")
    assert (original.dtype, original.model_implementation) == ("fp16", "original")
    assert train_section("train.execution=original", "train.precision=fp32").dtype == "fp32"  # CPU runs
    ds = deepspeed_config(load_config(None, DEMO + ["train.execution=original"]), plan_batch(48, 1, 12))
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 7} and not ds["bf16"]["enabled"]
    ds = deepspeed_config(load_config(None, DEMO), plan_batch(48, 1, 12))
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]


@pytest.mark.parametrize("overrides, match", [
    (["train.execution=slow"], "train.execution"),
    (["train.precision=fp16"], "train.precision"),  # fp16 is the original execution's
    (["train.execution=original", "train.precision=bf16"], "train.precision"),
    (["train.execution=original", "train.compile=true"], "train.compile"),
    (["train.execution=original", "train.cuda_graph=true"], "train.compile / cuda_graph"),
    (["train.cuda_graph=true"], "train.cuda_graph"),  # replays the compiled graphs
])
def test_execution_switches_are_validated(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, DEMO + overrides)


def test_the_optimizer_checks_finiteness_only_where_deepspeed_does_not():
    module = torch.nn.Linear(3, 2)
    cfg = load_config(None, DEMO).optim
    assert isinstance(build_optimizer(module, cfg), SkipNonFiniteAdamW)
    plain = build_optimizer(module, cfg, skip_non_finite=False)
    assert type(plain) is torch.optim.AdamW and not plain.defaults["fused"]
    assert build_optimizer(module, cfg, skip_non_finite=False, fused=True).defaults["fused"]


@pytest.mark.parametrize("settings, message", [
    (("train.compile=true", "train.cuda_graph=true"), "train.cuda_graph: CUDA graphs need a CUDA device"),
    (("train.execution=original", "train.precision=auto"), "fp16 needs a CUDA device"),
], ids=["cuda_graph", "fp16"])
def test_gpu_only_settings_on_a_cpu_are_config_errors(tmp_path, monkeypatch, caplog, settings, message):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU refusal")
    caplog.set_level(logging.ERROR, logger="sslam_fast.train")
    assert run_in_process(monkeypatch, str(tmp_path), *settings) == 1
    assert message in caplog.text


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_bf16_non_finite_steps_are_skipped_by_deepspeed(tmp_path, monkeypatch, zero_stage):
    """bf16 builds a plain AdamW (no finite check of its own): DeepSpeed's optimizer skips the step."""
    def poison(n, out):
        if n == 2:
            out["loss"] = out["loss"] * float("nan")

    patch_forward(monkeypatch, poison)
    assert run_in_process(monkeypatch, str(tmp_path), "train.max_steps=3", "train.precision=bf16",
                          f"deepspeed.zero_stage={zero_stage}") == 0
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(line["step"], line["skipped"]) for line in lines] == [(1, 0), (1, 1), (2, 0), (3, 0)]
    assert all(isinstance(line["loss"], float) for line in lines[2:])


def test_metrics_are_read_one_step_late_and_every_step_is_logged(tmp_path, monkeypatch):
    run_dir = str(tmp_path)
    seen = []

    def lines_at_forward(n, out):
        path = os.path.join(run_dir, "metrics.jsonl")
        seen.append(sum(1 for _ in open(path)) if os.path.exists(path) else 0)

    patch_forward(monkeypatch, lines_at_forward)
    assert run_in_process(monkeypatch, run_dir, "train.max_steps=5", "checkpoint.every_steps=100") == 0
    # while step n computes, step n - 1 has not been logged yet: it is read after step n's update
    assert seen == [0, 0, 1, 2, 3]
    lines = logged(run_dir)
    assert sorted(lines) == [1, 2, 3, 4, 5]  # the last step too, read when the run ends
    assert all(isinstance(line["loss"], float) and isinstance(line["grad_norm"], float) for line in lines.values())
    assert [line["lr"] for line in lines.values()][:3] == pytest.approx([0, 2.5e-4, 5e-4])


def test_original_execution_gives_the_fast_losses_in_fp32(tmp_path, monkeypatch):
    """The model side of the two executions on a CPU (DeepSpeed runs no fp16 there; the fp16 part is
    the GPU-marked test below): the original implementation against the fused one, fp32, 4 updates."""
    fast, original = str(tmp_path / "fast"), str(tmp_path / "original")
    assert run_in_process(monkeypatch, fast, "train.max_steps=4") == 0
    assert run_in_process(monkeypatch, original, "train.max_steps=4", "train.execution=original") == 0
    a, b = logged(fast), logged(original)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        for key in ("loss", "patch_loss", "cls_loss", "target_var", "grad_norm"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-6), (step, key)


@pytest.mark.slow
def test_compiled_step_gives_the_eager_losses(tmp_path, monkeypatch):
    """train.compile through DeepSpeed: the whole step as one compiled graph (about a minute of
    compiling on a 2-core CPU)."""
    from torch._dynamo.utils import counters

    eager, compiled = str(tmp_path / "eager"), str(tmp_path / "compiled")
    assert run_in_process(monkeypatch, eager, "train.max_steps=3") == 0
    counters.clear()
    assert run_in_process(monkeypatch, compiled, "train.max_steps=3", "train.compile=true") == 0
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    a, b = logged(eager), logged(compiled)
    assert sorted(b) == [1, 2, 3]
    assert all(b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-5) for s in a)


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_one_process_reads_the_fp32_masters_in_place(tmp_path, monkeypatch, zero_stage):
    trainer = trainer_in_process(monkeypatch, tmp_path, "train.max_steps=1", "train.precision=bf16",
                                 f"deepspeed.zero_stage={zero_stage}")
    masters = trainer.masters
    assert all(full is part for full, part in zip(masters.full, masters.parts))
    stepped = [p for g in trainer.engine.optimizer.optimizer.param_groups for p in g["params"]]  # AdamW's own
    ptrs = [(p.data_ptr(), p.data_ptr() + p.numel() * p.element_size()) for p in stepped]
    views = masters.gather()
    assert all(v.dtype == torch.float32 for v in views)
    assert all(any(lo <= v.data_ptr() < hi for lo, hi in ptrs) for v in views)  # no second fp32 copy
    trainer.data.close()


@pytest.mark.gpu
@requires_cuda
def test_prefetcher_copies_on_a_side_stream_and_hands_over_the_same_batches():
    from sslam_fast.trainer.prefetch import Prefetcher

    batches = [{"fbank": torch.randn(4, 1, 64, 128), "index": torch.arange(4) + 4 * i} for i in range(6)]

    class Loader:
        def __iter__(self):
            return iter(batches)

        def state_dict(self):
            return {}

    data = Prefetcher(Loader(), torch.device("cuda"), depth=2)
    for expected in batches:
        got = data.next()
        assert got["fbank"].is_cuda and set(got) == {"fbank", "index"}
        assert torch.equal(got["fbank"].cpu(), expected["fbank"]) and torch.equal(got["index"].cpu(), expected["index"])
    data.close()


@pytest.mark.gpu
@requires_cuda
def test_original_fp16_execution_gives_the_fast_losses_on_a_gpu(tmp_path, monkeypatch):
    pytest.importorskip("deepspeed")
    fast, original = str(tmp_path / "fast"), str(tmp_path / "original")
    assert run_in_process(monkeypatch, fast, "train.max_steps=4", "train.precision=auto") == 0
    assert run_in_process(monkeypatch, original, "train.max_steps=4", "train.execution=original",
                          "train.precision=auto") == 0
    a, b = logged(fast), logged(original)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4] and not any(line["skipped"] for line in b.values())
    for step in a:  # bf16 against fp16 autocast: the dtype tolerance of a 2-layer model
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=3e-2), step


@pytest.mark.gpu
@requires_cuda
def test_cuda_graph_step_gives_the_eager_losses_on_a_gpu(tmp_path, monkeypatch):
    pytest.importorskip("deepspeed")
    eager, graphed = str(tmp_path / "eager"), str(tmp_path / "graphed")
    assert run_in_process(monkeypatch, eager, "train.max_steps=4", "train.precision=auto") == 0
    assert run_in_process(monkeypatch, graphed, "train.max_steps=4", "train.precision=auto", "train.compile=true",
                          "train.cuda_graph=true") == 0
    a, b = logged(eager), logged(graphed)
    assert sorted(b) == [1, 2, 3, 4]
    assert all(b[s]["loss"] == pytest.approx(a[s]["loss"], rel=2e-2) for s in a)  # bf16, compiled vs eager
