"""Train configs: validation, overrides, the batch plan across GPU counts, LR schedule, optimizer groups."""
import glob
import json
import math
import os

import pytest
import torch

from sslam_fast import SSLAMConfig, SSLAMPretrainer
from sslam_fast.config import ConfigError
from sslam_fast.trainer.optim import CosineWithWarmup, build_optimizer, build_scheduler, param_groups, plan_batch
from sslam_fast.trainer.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the pretraining configs (finetune_*.json and linear_*.json are checked in test_finetune.py)
CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "*.json"))
                 if not os.path.basename(p).startswith(("finetune_", "linear_")))


def test_the_three_configs_exist_and_validate():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"as2m.json", "as2m_sslam.json", "demo.json"} <= names
    for path in CONFIGS:
        cfg = load_config(path)
        assert cfg.train.global_batch > 0 and cfg.optim.cosine_steps


def test_as2m_configs_state_the_paper_recipe():
    s1, s2 = load_config(os.path.join(REPO, "configs/as2m.json")), load_config(os.path.join(REPO, "configs/as2m_sslam.json"))
    for cfg in (s1, s2):
        assert cfg.train.global_batch == 48 and cfg.train.precision == "bf16"
        assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 0.05 and cfg.optim.clip_grad == 4.0
        assert (cfg.model.ema_decay, cfg.model.ema_end_decay, cfg.model.ema_anneal_end_step) == (0.9998, 0.99999, 100_000)
        assert cfg.model.clone_batch * cfg.model.stage == 16  # 192 views per 12 clips in both stages
    assert (s1.optim.lr, s1.optim.warmup_steps, s1.cosine_steps, s1.model.stage) == (5e-4, 53_333, 400_000, 1)
    assert (s2.optim.lr, s2.optim.warmup_steps, s2.cosine_steps, s2.model.stage) == (5e-5, 25_000, 200_000, 2)
    assert s2.train.init_from


def test_normalisation_defaults_are_the_audioset_statistics():
    """docs/method.md §2.6: mean -4.268, std 4.569, the same in the front end, the loader, the data
    config and every config that states them."""
    import inspect

    from sslam_fast.data import audio, build_loader
    from sslam_fast.data.loader import AudioLoader
    from sslam_fast.trainer.config import DataConfig

    assert (audio.NORM_MEAN, audio.NORM_STD) == (-4.268, 4.569)
    assert (DataConfig.norm_mean, DataConfig.norm_std) == (-4.268, 4.569)
    params = inspect.signature(build_loader).parameters
    assert (params["norm_mean"].default, params["norm_std"].default) == (-4.268, 4.569)
    assert (AudioLoader.norm_mean, AudioLoader.norm_std) == (-4.268, 4.569)
    for path in CONFIGS:
        data = json.load(open(path)).get("data", {})
        assert (data.get("norm_mean", -4.268), data.get("norm_std", 4.569)) == (-4.268, 4.569), path


def test_unknown_keys_are_errors_naming_them(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"train": {"max_step": 3}, "data": {"demo_clips": 4}}))
    with pytest.raises(ConfigError, match="'max_step'"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="'embed_dimm'"):
        load_config(None, ["model.embed_dimm=8", "data.demo_clips=4"])
    with pytest.raises(ConfigError, match="'optimizer'"):
        load_config(None, ["optimizer.lr=1", "data.demo_clips=4"])
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(None, ["train.precision=fp16", "data.demo_clips=4"])
    with pytest.raises(ConfigError, match="data.manifest"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="zero_stage: must be 0, 1 or 2"):
        load_config(None, ["deepspeed.zero_stage=3", "data.demo_clips=4"])


def test_overrides_parse_json_values_and_plain_strings():
    cfg = load_config(os.path.join(REPO, "configs/as2m.json"),
                      ["train.max_steps=7", "checkpoint.dir=/tmp/run x", "optim.betas=[0.8,0.9]",
                       "deepspeed.extra={\"zero_optimization\": {\"overlap_comm\": true}}", "train.init_from=null"])
    assert cfg.train.max_steps == 7 and cfg.checkpoint.dir == "/tmp/run x" and cfg.optim.betas == (0.8, 0.9)
    assert cfg.deepspeed.extra == {"zero_optimization": {"overlap_comm": True}}
    assert cfg.train.init_from is None
    assert cfg.cosine_steps == 400_000  # the schedule does not follow max_steps when it is stated
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.max_steps"])


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8, 12, 16, 48])
def test_batch_plan_keeps_the_global_batch(world):
    plan = plan_batch(48, world, 12)
    assert plan.micro_batch * plan.accumulation * plan.world_size == 48
    assert plan.micro_batch <= 12
    assert plan.accumulation == math.ceil(48 / world / 12) or (48 // world) % math.ceil(48 / world / 12)


def test_batch_plan_accumulates_when_the_micro_batch_is_capped():
    assert (plan_batch(48, 1, 12).micro_batch, plan_batch(48, 1, 12).accumulation) == (12, 4)
    assert (plan_batch(48, 4, 12).micro_batch, plan_batch(48, 4, 12).accumulation) == (12, 1)
    assert (plan_batch(48, 2, 10).micro_batch, plan_batch(48, 2, 10).accumulation) == (8, 3)
    with pytest.raises(ConfigError, match="not divisible"):
        plan_batch(48, 5, 12)


def test_cosine_schedule_with_warmup():
    f = CosineWithWarmup(lr=5e-4, min_lr=5e-6, warmup=100, total=1100)
    assert f(0) == 0 and f(50) == pytest.approx(0.5) and f(100) == pytest.approx(1.0)
    assert f(600) == pytest.approx(0.01 + 0.99 * 0.5)
    assert f(1100) == pytest.approx(0.01) and f(5000) == pytest.approx(0.01)
    values = [f(s) for s in range(100, 1101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_scheduler_state_does_not_carry_the_schedule():
    cfg = load_config(os.path.join(REPO, "configs/demo.json"))
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, 200)
    for _ in range(30):
        opt.step()
        sched.step()
    state = sched.state_dict()
    assert state["last_epoch"] == 30 and all(fn is None for fn in state["lr_lambdas"])
    assert sched.get_last_lr()[0] == pytest.approx(cfg.optim.lr * CosineWithWarmup(cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps, 200)(30))


def test_no_weight_decay_on_biases_norms_and_cls():
    model = SSLAMPretrainer(SSLAMConfig(embed_dim=32, depth=2, num_heads=2, decoder_layers=1, decoder_groups=8,
                                        average_top_k_layers=2))
    from sslam_fast.trainer.engine import StudentAndDecoder

    trainable = StudentAndDecoder(model)
    decay, no_decay = param_groups(trainable, 0.05)
    names = {id(p): n for n, p in trainable.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} == {
        n for n, p in trainable.named_parameters() if p.ndim == 1 or n.endswith("cls_token")}
    assert all(p.ndim >= 2 for p in decay["params"])
    assert "student.blocks.0.attn.qkv.weight" in {names[id(p)] for p in decay["params"]}
    # the optimizer sees the student and the decoder, never the teacher
    opt_params = {id(p) for g in build_optimizer(trainable, load_config(None, ["data.demo_clips=1"]).optim).param_groups
                  for p in g["params"]}
    assert opt_params == {id(p) for p in trainable.parameters()}
    assert not opt_params & {id(p) for p in model.teacher.parameters()}


def test_deepspeed_config_from_the_train_config():
    from sslam_fast.trainer.engine import deepspeed_config

    cfg = load_config(os.path.join(REPO, "configs/as2m.json"),
                      ["deepspeed.extra={\"zero_optimization\": {\"overlap_comm\": true}, \"wall_clock_breakdown\": true}"])
    ds = deepspeed_config(cfg, plan_batch(48, 8, 12))
    assert ds["train_batch_size"] == 48 and ds["train_micro_batch_size_per_gpu"] == 6
    assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 4.0
    assert ds["bf16"] == {"enabled": True}
    assert ds["zero_optimization"] == {"stage": 0, "overlap_comm": True} and ds["wall_clock_breakdown"] is True
