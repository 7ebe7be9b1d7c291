"""What a user of the trainer reads and sets: the small CPU recipes, the stage-2 mixing windows
against the clip length, the gradient norm in the metrics, the summary line and the help texts."""
import json
import logging
import os
import re
import socket

import pytest
import torch

from sslam_fast import cli, train
from sslam_fast.config import ConfigError
from sslam_fast.mixing import draw_mix_windows, scaled_mix_windows, windows_fit
from sslam_fast.trainer.config import load_config
from sslam_fast.trainer.memory import estimate, memory_message
from sslam_fast.trainer.runlog import RunLog

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.clone_batch=2", "model.decoder_layers=1",
    "model.decoder_groups=8", "model.average_top_k_layers=2", "model.attention=sdpa",
    "data.demo_clips=8", "data.target_length=128", "data.backend=torch", "data.num_workers=0",
    "train.global_batch=4", "train.max_micro_batch=2", "train.max_steps=2", "train.precision=fp32",
    "optim.warmup_steps=1", "optim.clip_grad=1e6", "checkpoint.every_steps=2", "logging.every_steps=1",
    "logging.tensorboard=false", "logging.progress_bar=false",
]


@pytest.mark.parametrize("name", ["small.json", "small_sslam.json"])
def test_small_recipes_validate_and_fit_their_clips(name):
    cfg = load_config(os.path.join(REPO, "configs", name), ["data.manifest=x.tsv"])
    m = cfg.model
    assert m.embed_dim <= 384 and cfg.data.target_length < 1024 and cfg.train.precision == "fp32"
    assert windows_fit(cfg.data.target_length, m.mix_window, m.mix_w1_max, m.mix_w2_max) or m.stage == 1
    if m.stage == 2:
        assert (m.mix_window, m.mix_w1_max, m.mix_w2_max) == scaled_mix_windows(cfg.data.target_length)


def test_stage2_windows_that_do_not_fit_the_clips_are_a_config_error_naming_the_keys():
    with pytest.raises(ConfigError) as err:
        load_config(os.path.join(REPO, "configs", "as2m_sslam.json"), ["data.target_length=256"])
    message = str(err.value)
    assert "\n" not in message
    for key in ("model.mix_window=240", "mix_w1_max=496", "mix_w2_max=782", "data.target_length=256"):
        assert key in message, key
    suggested = re.findall(r"--set (\S+)", message)
    assert suggested == ["model.mix_window=64", "model.mix_w1_max=112", "model.mix_w2_max=192"]
    load_config(os.path.join(REPO, "configs", "as2m_sslam.json"), ["data.target_length=256", *suggested])
    load_config(os.path.join(REPO, "configs", "as2m.json"), ["data.target_length=256"])  # stage 1 mixes nothing


@pytest.mark.parametrize("frames", [128, 256, 400, 512, 1024])
def test_scaled_windows_draw(frames):
    window, w1, w2 = scaled_mix_windows(frames)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        a, b = draw_mix_windows(g, frames, window, w1, w2)
        assert 0 <= a and a + window <= b and b + window <= frames


def one_process(mp):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port)).items():
        mp.setenv(key, value)


def test_memory_is_estimated_before_the_model_is_built():
    """Against peak resident memory measured on the 2-core CPU (README, Small recipes) and the ~15 GB
    a one-process ViT-B (configs/as2m.json) run took there."""
    small = estimate(load_config(os.path.join(REPO, "configs", "small.json")), 8).total
    small2 = estimate(load_config(os.path.join(REPO, "configs", "small_sslam.json")), 8).total
    base = estimate(load_config(os.path.join(REPO, "configs", "as2m.json")), 12).total
    assert small == pytest.approx(1.16e9, rel=0.25) and small2 == pytest.approx(1.60e9, rel=0.25)
    assert base == pytest.approx(15e9, rel=0.25)
    cfg = load_config(os.path.join(REPO, "configs", "as2m.json"))
    text, fits = memory_message(cfg, 12, 1, 64e9)
    assert fits and "WILL NOT FIT" not in text
    text, fits = memory_message(cfg, 12, 2, 16e9)
    assert not fits and "WILL NOT FIT" in text and "train.max_micro_batch" in text and "\n" not in text


def test_metrics_carry_the_gradient_norm_where_deepspeed_does_not(tmp_path, monkeypatch, caplog):
    """ZeRO-0 in fp32 (DeepSpeed reports no norm: computed by the trainer) and ZeRO-2 (DeepSpeed's
    own) give the same pre-clipping norm on the same first step, with gradient accumulation."""
    caplog.set_level(logging.INFO, logger="sslam_fast.train")
    norms = {}
    for stage in (0, 2):
        one_process(monkeypatch)
        run = tmp_path / f"zero{stage}"
        assert train.main([a for s in TINY + [f"deepspeed.zero_stage={stage}", f"checkpoint.dir={run}"]
                           for a in ("--set", s)]) == 0
        lines = [json.loads(line) for line in open(run / "metrics.jsonl")]
        norms[stage] = [line["grad_norm"] for line in lines]
    assert all(isinstance(n, float) and n > 0 for n in norms[0] + norms[2]), norms
    assert norms[0] == pytest.approx(norms[2], rel=1e-4)
    assert "memory estimate per process" in caplog.text


def test_summary_before_the_first_metrics_line(tmp_path):
    log = RunLog(str(tmp_path), 0, 10, 8, 5, False, False, True)
    text = log.summary(0, 0, 0, None, "SIGTERM received at step 0")
    log.close()
    assert "no metrics line yet" in text and "nan" not in text


def test_help_texts_name_only_flags_that_exist():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.choices and "train" in a.choices).choices
    for name, sub in subparsers.items():
        flags = {flag for action in sub._actions for flag in action.option_strings}
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", sub.description or "")) | {
            flag for action in sub._actions for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", action.help or "")}
        assert named <= flags, (name, named - flags)


def test_the_smoke_run_and_the_demo_write_to_different_folders():
    smoke = load_config(os.path.join(REPO, "configs", "demo.json")).checkpoint.dir
    demo = next(a for a in cli.build_parser()._actions if a.choices and "demo" in a.choices).choices["demo"]
    out = next(a.default for a in demo._actions if "--out" in a.option_strings)
    assert os.path.normpath(smoke) != os.path.normpath(out)


def test_bf16_on_a_cpu_without_native_bf16_is_named(tmp_path, monkeypatch, caplog):
    """Pretraining and fine-tuning launches say, once, that bf16 is emulated (slower than fp32) on
    a CPU without AVX512-BF16 / AMX; nothing on a CPU with them, in fp32, or on CUDA."""
    from sslam_fast import finetune
    from sslam_fast.evaluation import finetune as ft
    from sslam_fast.released import inference
    from sslam_fast.trainer import preflight

    monkeypatch.setattr(inference, "native_bf16", lambda info=None: False)
    text = preflight.emulated_bf16_warning("bf16", cuda=False)
    assert "no native bf16" in text and "train.precision=fp32" in text
    assert preflight.emulated_bf16_warning("fp32", cuda=False) is None
    assert preflight.emulated_bf16_warning("bf16", cuda=True) is None
    monkeypatch.setattr(inference, "native_bf16", lambda info=None: True)
    assert preflight.emulated_bf16_warning("bf16", cuda=False) is None

    class Stop(ConfigError):
        pass

    def stop(*args, **kwargs):
        raise Stop("stopped after the launch checks")

    monkeypatch.setattr(inference, "native_bf16", lambda info=None: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(train, "Trainer", stop)
    monkeypatch.setattr(finetune, "run_finetune", stop)
    one_process(monkeypatch)
    caplog.set_level(logging.WARNING)
    for precision, expected in (("bf16", 1), ("fp32", 0)):
        caplog.clear()
        values = TINY + [f"train.precision={precision}", f"checkpoint.dir={tmp_path / precision}"]
        assert train.main([a for s in values for a in ("--set", s)]) == 1
        assert caplog.text.count("no native bf16") == expected, caplog.text
    assert ft.FinetuneConfig().train.precision == "bf16"
    caplog.clear()
    assert finetune.main(["--set", f"data.dir={tmp_path}"]) == 1  # the defaults: bf16; stopped before data is read
    assert caplog.text.count("no native bf16") == 1, caplog.text
