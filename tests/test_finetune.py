"""Fine-tuning and linear evaluation (sslam_fast.evaluation.finetune) on tiny data, on the CPU:
drop path, layer decay, the augmentations, learning a separable toy task, exact resume, linear
evaluation, balanced sampling, the balanced-weights command and the shipped configs."""
import glob
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from sslam_fast import cli, finetune
from sslam_fast.config import SSLAMConfig
from sslam_fast.evaluation import finetune as ft
from sslam_fast.evaluation.sampling import balanced_weights, read_weights
from sslam_fast.model import Block, Encoder, drop_path
from sslam_fast.pretrainer import SSLAMPretrainer
from sslam_fast.released.formats import save_pretrainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENCODER = dict(embed_dim=32, depth=2, num_heads=2, attention="sdpa", average_top_k_layers=2,
               decoder_layers=1, decoder_groups=8)
FREQS = (250, 1000, 3000, 6000)


def toy_task(root, per_class=12, eval_per_class=4, multilabel=False, seed=0):
    """A fairseq task directory of 1 s clips: class c is a tone near FREQS[c] (multi-label: a sum of
    tones of a random non-empty subset of the classes)."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "audio"), exist_ok=True)
    with open(os.path.join(root, "label_descriptors.csv"), "w") as f:
        f.writelines(f"{i},tone{i},Tone {hz} Hz\n" for i, hz in enumerate(FREQS))
    t = np.arange(16000) / 16000
    for split, n in (("train", per_class), ("eval", eval_per_class)):
        rows, lbl = [], []
        for i in range(n * len(FREQS)):
            classes = [i % len(FREQS)]
            if multilabel:
                classes = sorted(set(classes) | set(np.flatnonzero(rng.random(len(FREQS)) < 0.3).tolist()))
            wave = 0.01 * rng.standard_normal(16000)
            for c in classes:
                wave += rng.uniform(0.1, 0.3) * np.sin(2 * np.pi * FREQS[c] * rng.uniform(0.95, 1.05) * t + rng.uniform(0, 6))
            rel = f"audio/{split}_{i:03d}.wav"
            sf.write(os.path.join(root, rel), wave.astype(np.float32), 16000)
            rows.append(f"{rel}\t16000\n")
            lbl.append(f"{split}_{i:03d}\t{','.join(f'tone{c}' for c in classes)}\n")
        with open(os.path.join(root, f"{split}.tsv"), "w") as f:
            f.write(root + "\n" + "".join(rows))
        with open(os.path.join(root, f"{split}.lbl"), "w") as f:
            f.write("".join(lbl))
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny(task_dir, run_dir, *extra):
    values = [
        f"data.dir={task_dir}", "data.task=multiclass", "data.target_length=96", "data.num_workers=0",
        "model.encoder=" + json.dumps(ENCODER),
        "train.global_batch=8", "train.max_micro_batch=4", "train.precision=fp32",
        "optim.lr=2e-3", "optim.warmup_steps=2", "optim.clip_grad=1e6",
        f"checkpoint.dir={run_dir}", "checkpoint.every_steps=2", "checkpoint.keep_last=2",
        "logging.every_steps=1", "logging.tensorboard=false", "logging.progress_bar=false",
        *extra,
    ]
    return [arg for value in values for arg in ("--set", value)]


def run_in_process(mp, task_dir, run_dir, *extra) -> int:
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port())).items():
        mp.setenv(key, value)
    return finetune.main(tiny(task_dir, run_dir, *extra))


def lines(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def train_losses(run_dir):
    return {line["step"]: line["loss"] for line in lines(run_dir) if "loss" in line}


def eval_lines(run_dir):
    return [line for line in lines(run_dir) if "eval_clips" in line]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return toy_task(str(tmp_path_factory.mktemp("toy")))


@pytest.fixture(scope="module")
def toy_multilabel(tmp_path_factory):
    return toy_task(str(tmp_path_factory.mktemp("toy_ml")), per_class=4, eval_per_class=3, multilabel=True)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("pretrained") / "tiny.pt")
    save_pretrainer(SSLAMPretrainer(SSLAMConfig(**ENCODER)), path)
    return path


# ----------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------


def test_drop_path_is_off_by_default_and_scales_kept_samples():
    torch.manual_seed(0)
    block = Block(16, 2, 4.0, 1e-6, "sdpa")
    x = torch.randn(64, 5, 16)
    assert block.drop_path == 0.0
    block.train()
    assert torch.equal(block(x)[0], block(x)[0])  # no randomness at rate 0
    block.drop_path = 0.5
    out_a, out_b = block(x)[0], block(x)[0]
    assert not torch.equal(out_a, out_b)
    block.eval()
    plain = Block(16, 2, 4.0, 1e-6, "sdpa")
    plain.load_state_dict(block.state_dict())
    plain.eval()
    assert torch.equal(block(x)[0], plain(x)[0])  # inactive in eval mode
    rows = drop_path(torch.ones(4000, 3), 0.25, True)[:, 0]
    assert set(rows.unique().tolist()) <= {0.0, float(torch.tensor(1 / 0.75))} and abs(float((rows == 0).float().mean()) - 0.25) < 0.03
    encoder = Encoder(SSLAMConfig(embed_dim=32, depth=4, num_heads=2, average_top_k_layers=4, decoder_groups=8))
    encoder.set_drop_path(0.1)
    assert [b.drop_path for b in encoder.blocks] == pytest.approx(np.linspace(0, 0.1, 4).tolist())


def test_layer_decay_groups_follow_the_original():
    cfg = ft.FinetuneModelSection(encoder=dict(ENCODER, depth=3, average_top_k_layers=3))
    model = ft.build_classifier(cfg, 5)
    groups = ft.layer_decay_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.5, decay_exclusions=True)
    scale_of = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(scale_of) == len(named)
    assert scale_of[id(named["encoder.blocks.0.attn.qkv.weight"])] == (0.5 ** 3, 0.05)
    assert scale_of[id(named["encoder.blocks.2.mlp.fc1.weight"])] == (0.5, 0.05)
    assert scale_of[id(named["encoder.blocks.2.mlp.fc1.bias"])] == (0.5, 0.0)
    assert scale_of[id(named["encoder.blocks.1.norm1.weight"])] == (0.25, 0.0)
    for name in ("encoder.patch_embed.weight", "encoder.cls_token", "head.weight"):
        assert scale_of[id(named[name])] == (1.0, 0.05)
    assert scale_of[id(named["head_norm.weight"])] == (1.0, 0.0)
    assert all(g["lr"] == g["lr_scale"] for g in groups)
    frozen = ft.build_classifier(ft.FinetuneModelSection(encoder=ENCODER, freeze_encoder=True), 5)
    kept = [p for g in ft.layer_decay_groups(frozen, 1.0, 0.05, 0.65) for p in g["params"]]
    assert {id(p) for p in kept} == {id(p) for p in list(frozen.head.parameters()) + list(frozen.head_norm.parameters())}


def original_group_lr(step, peak, min_lr=1e-6, warmup=4000, total=40_000):
    """fairseq's cosine scheduler of one composite-optimizer group, as the original configures it
    (warmup_init_lr unset, so it starts at min_lr); groups whose peak is below min_lr stay flat."""
    if peak <= min_lr:
        return peak
    if step < warmup:
        return min_lr + step * (peak - min_lr) / warmup
    t = (step - warmup) / (total - warmup)
    return min_lr + 0.5 * (peak - min_lr) * (1 + np.cos(np.pi * t))


# The SSLAM AS-20K fine-tuning log (tb/train_inner of SSLAM_Finetune/SSLAM_Ft_AS20K in ta012/SSLAM):
# LR of the group at 5e-5 * 0.65 ** k after an update, as logged (float32)
PUBLISHED_AS20K_LR = {
    12: [(200, 2.844004427515756e-07), (22000, 2.844004427515756e-07), (39800, 2.844004427515756e-07)],
    9: [(200, 1.0017797649197746e-06), (10000, 1.0332112196920207e-06), (39800, 1.000002725959348e-06)],
    4: [(200, 1.3962655884824926e-06), (2000, 4.96265647598193e-06), (10000, 8.394416909141e-06)],
    0: [(200, 3.4499998946557753e-06), (2000, 2.5499999537714757e-05), (10000, 4.671762144425884e-05),
        (39800, 1.0037314268629416e-06)],
}


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_each_layer_decay_group_runs_the_original_schedule():
    model = ft.build_classifier(ft.FinetuneModelSection(encoder=dict(ENCODER, depth=12, average_top_k_layers=12)), 5)
    o = ft.FinetuneOptimSection(lr=5e-5, min_lr=1e-6, warmup_steps=4000)
    groups = ft.layer_decay_groups(model, o.lr, o.weight_decay, 0.65)
    scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.AdamW(groups), ft.group_lr_lambdas(groups, o, 40_000))
    peaks = sorted({g["initial_lr"] for g in groups})
    assert len(peaks) == 13 and peaks[0] == pytest.approx(2.844e-7, rel=1e-3) and peaks[-1] == 5e-5
    flat = [p for p in peaks if p < 1e-6]
    assert flat == pytest.approx([5e-5 * 0.65 ** k for k in (12, 11, 10)])  # blocks 0-2, flat in the published log
    done = 0
    for step in (0, 1, 2000, 3999, 4000, 4001, 22_000, 39_999, 40_000):
        for _ in range(step - done):
            scheduler.step()
        done = step
        for g in groups:
            assert g["lr"] == pytest.approx(original_group_lr(step, g["initial_lr"]), rel=1e-9, abs=0), (step, g["initial_lr"])
    assert sorted({g["lr"] for g in groups}) == pytest.approx(flat + [1e-6])  # the floor is absolute
    lambdas = dict(zip((g["initial_lr"] for g in groups), ft.group_lr_lambdas(groups, o, 40_000)))
    for k, logged in PUBLISHED_AS20K_LR.items():
        peak = next(p for p in lambdas if p == pytest.approx(5e-5 * 0.65 ** k))
        assert [peak * lambdas[peak](step) for step, _ in logged] == pytest.approx([lr for _, lr in logged], rel=1e-6)
    scaled = ft.group_lr_lambdas(groups, ft.FinetuneOptimSection(lr=5e-5, lr_floor="scaled", warmup_steps=4000), 40_000)
    assert [f(0) for f in scaled] == [0.0] * len(groups) and scaled[0](40_000) == pytest.approx(1e-6 / 5e-5)


def test_recipe_weight_decay_reaches_every_parameter():
    model = ft.build_classifier(ft.FinetuneModelSection(encoder=ENCODER), 5)
    groups = ft.layer_decay_groups(model, 1e-2, 0.05, 0.65)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam's own step is 0: what moves is the decoupled decay
    ft.SkipNonFiniteAdamW(groups, lr=1e-2, weight_decay=0.05).step()
    scale = {id(p): g["lr"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert torch.allclose(p, before[name] * (1 - scale[id(p)] * 0.05), rtol=1e-6, atol=0), name
        assert not torch.equal(p, before[name]) or not before[name].any(), name
    excluded = ft.layer_decay_groups(model, 1e-2, 0.05, 0.65, decay_exclusions=True)
    assert {g["weight_decay"] for g in excluded} == {0.0, 0.05}


def test_recipe_fidelity_refuses_deviations_and_custom_names_them():
    ft.load_finetune_config(None, ["data.dir=x"])
    for override in ("optim.lr_floor=scaled", "optim.decay_exclusions=true", "data.min_samples=0"):
        with pytest.raises(ft.ConfigError, match="fidelity"):
            ft.load_finetune_config(None, ["data.dir=x", override])
        cfg = ft.load_finetune_config(None, ["data.dir=x", override, "fidelity=custom"])
        assert len(cfg.deviations()) == 1 and override.split("=")[0] in cfg.deviations()[0]


def test_classifier_reads_the_cls_token():
    torch.manual_seed(0)
    model = ft.build_classifier(ft.FinetuneModelSection(encoder=ENCODER, drop_path=0.0), 5).eval()
    with torch.no_grad():
        model.head_norm.weight.uniform_(0.5, 1.5)
        fbank = torch.randn(3, 1, 96, 128)
        tokens = model.encoder(fbank)
        logits = model(fbank)
        assert torch.allclose(logits, model.head(model.head_norm(tokens[:, 0])), atol=1e-6)
        assert not torch.allclose(logits, model.head(model.head_norm(tokens[:, 1:].mean(1))), atol=1e-3)


def test_the_defaults_are_the_published_recipe():
    cfg = ft.FinetuneConfig()
    m, a, o = cfg.model, cfg.augment, cfg.optim
    assert (m.layer_decay, m.drop_path, m.head_norm_eps) == (0.65, 0.1, 1e-6)
    assert (a.mixup, a.mixup_prob, a.mask_ratio, a.roll) == (0.8, 0.9, 0.2, True)
    assert (o.lr, o.min_lr, tuple(o.betas), o.weight_decay, o.lr_floor, o.decay_exclusions) == (
        5e-5, 1e-6, (0.9, 0.95), 0.05, "absolute", False)
    assert (cfg.data.min_samples, cfg.fidelity) == (10_000, "recipe")


@pytest.mark.parametrize("loss,task", [("bce", "multilabel"), ("bce", "multiclass"), ("ce", "multiclass")])
def test_losses_and_their_normalisers_follow_the_original(loss, task):
    torch.manual_seed(0)
    model = ft.build_classifier(ft.FinetuneModelSection(encoder=ENCODER, drop_path=0.0), 4).eval()
    engine = ft._Engine(model, loss, task, label_smoothing=0.1, autocast=None)
    fbank = torch.randn(6, 1, 96, 128)
    target = torch.eye(4)[[0, 1, 2, 3, 0, 1]]
    if task == "multilabel":
        target[[0, 2], 3] = 1.0
    with torch.no_grad():
        logits = model(fbank)
        if loss == "bce":
            expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="sum")
        else:
            expected = 6 * torch.nn.functional.cross_entropy(logits, target.argmax(1), label_smoothing=0.1)
        soft = -(target * torch.log_softmax(logits, -1)).sum()
        assert float(engine(fbank, target, soft=False)["loss_sum"]) == pytest.approx(float(expected), rel=1e-5)
        if loss == "ce":
            assert float(engine(fbank, target, soft=True)["loss_sum"]) == pytest.approx(float(soft), rel=1e-5)
    assert float(engine.loss_normaliser(target)) == (8.0 if task == "multilabel" else 6.0)  # the targets' sum, or clips


def test_roll_augmentation_gain_is_beta_10_10_plus_half():
    wave = torch.arange(1.0, 101.0)
    for seed in range(5):
        draws = np.random.default_rng(seed)
        shift, gain = int(draws.integers(100)), draws.beta(10, 10) + 0.5
        assert torch.allclose(ft.roll_waveform(wave, np.random.default_rng(seed)), torch.roll(wave, shift) * gain)
    rng = np.random.default_rng(0)
    gains = [float(ft.roll_waveform(torch.ones(8), rng)[0]) for _ in range(4000)]
    assert 0.5 < min(gains) and max(gains) < 1.5 and abs(np.mean(gains) - 1.0) < 0.01  # Beta(10, 10) has mean 0.5


def test_augmentations():
    rng = np.random.default_rng(0)
    x = torch.ones(16, 1, 96, 128)
    masked = ft.spec_mask(x, 0.2, rng)
    for clip in masked[:, 0]:
        zero_cols = (clip == 0).all(dim=0).sum().item()
        zero_rows = (clip == 0).all(dim=1).sum().item()
        assert zero_cols < 0.2 * 128 + 1 and zero_rows < 0.2 * 96 + 1
    assert (masked == 0).any() and ft.spec_mask(x, 0.0, rng) is x
    target = torch.eye(16)
    lams = []
    for _ in range(200):
        mixed, mixed_target, lam = ft.mixup(torch.arange(16.0), target, 0.8, 0.9, rng)
        lams.append(lam)
        assert torch.allclose(mixed, lam * torch.arange(16.0) + (1 - lam) * torch.arange(16.0).flip(0))
        assert torch.allclose(mixed_target.sum(1), torch.ones(16))
    assert 0.03 < np.mean(np.array(lams) == 1.0) < 0.2  # not applied with probability 0.1
    wave = torch.arange(100.0)
    rolled = ft.roll_waveform(wave, np.random.default_rng(1))
    ratio = rolled / torch.roll(wave, int(np.random.default_rng(1).integers(100)))
    assert torch.allclose(ratio[ratio == ratio], ratio[ratio == ratio][0]) and 0.5 < ratio[1] < 1.5


def test_balanced_loader_draws_by_the_weights(toy):
    d = ft.FinetuneDataSection(dir=toy, task="multiclass", target_length=96)
    manifest, labels, classes, _ = ft.read_split(d, "train")
    weights = np.where(np.array([c[0] for c in labels]) == 3, 10.0, 0.0)
    dataset = ft.LabelledClips(manifest, labels, classes, d, None, seed=0)
    loader = ft.FinetuneLoader(dataset, 4, seed=0, weights=weights, samples_per_epoch=8)
    assert set(loader.order(0).tolist()) <= set(np.flatnonzero(weights).tolist()) and len(loader.order(0)) == 8
    batches = iter(loader)
    first = next(batches)
    assert (first["target"].argmax(1) == 3).all() and loader.state_dict()["position"] == 4
    assert not np.array_equal(loader.order(1), ft.FinetuneLoader(dataset, 4, seed=0, weights=weights, samples_per_epoch=8).order(0))


def with_short_entries(toy, root, every=3):
    """The toy task with every ``every``-th manifest entry of both splits declared 9,999 samples long."""
    os.makedirs(root)
    for name in os.listdir(toy):
        if not name.endswith(".tsv"):
            os.symlink(os.path.join(toy, name), os.path.join(root, name))
            continue
        head, *rows = open(os.path.join(toy, name)).read().splitlines()
        rows = [r.replace("\t16000", "\t9999") if i % every == 0 else r for i, r in enumerate(rows)]
        with open(os.path.join(root, name), "w") as f:
            f.write("\n".join([head, *rows]) + "\n")
    return root


def test_entries_under_10000_samples_leave_both_splits(toy, tmp_path, monkeypatch):
    task = with_short_entries(toy, str(tmp_path / "task"))
    d = ft.FinetuneDataSection(dir=task, task="multiclass", target_length=96)
    for split, n in (("train", 48), ("eval", 16)):
        manifest, labels, _, kept = ft.read_split(d, split)
        assert len(kept) == n and kept.sum() == len(manifest) == len(labels) == n - len(range(0, n, 3))
        assert all(size >= 10_000 for size in manifest.sizes) and not kept[::3].any()
        full = ft.read_split(ft.FinetuneDataSection(dir=toy, task="multiclass", min_samples=0), split)
        assert labels == [full[1][i] for i in np.flatnonzero(kept)]
    weights = str(tmp_path / "weights.csv")
    np.savetxt(weights, np.arange(1.0, 49.0))  # one per manifest line, as the original's file
    run_dir = str(tmp_path / "run")
    assert run_in_process(monkeypatch, task, run_dir, "train.max_steps=1", f"data.weights_file={weights}",
                          "data.samples_per_epoch=16", "checkpoint.every_steps=100") == 0
    assert eval_lines(run_dir)[-1]["eval_clips"] == 16 - 6


def test_fewer_clips_than_one_batch_is_an_error_not_a_hang(toy, tmp_path, monkeypatch, caplog):
    """48 train clips and a batch of 64: the loader could never fill a batch and would spin."""
    code = run_in_process(monkeypatch, toy, str(tmp_path), "train.global_batch=64", "train.max_steps=1")
    assert code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "has 48 clips" in errors[0] and "fewer than train.global_batch=64" in errors[0], errors


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------


def test_finetune_learns_a_separable_toy_task(toy, tmp_path, monkeypatch):
    run_dir = str(tmp_path)
    assert run_in_process(monkeypatch, toy, run_dir, "train.max_steps=40", "train.eval_every_steps=20",
                          "model.layer_decay=1.0", "model.drop_path=0", "augment.mixup=0", "augment.mask_ratio=0",
                          "augment.roll=false", "optim.min_lr=2e-3", "checkpoint.every_steps=40") == 0
    losses = train_losses(run_dir)
    assert np.mean([losses[s] for s in range(36, 41)]) < 0.8 * np.mean([losses[s] for s in range(1, 6)])
    final = json.load(open(os.path.join(run_dir, "final.json")))
    assert final["metric"] == "accuracy" and final["step"] == 40 and final["value"] > 40.0  # chance is 25
    assert [e["step"] for e in final["evals"]] == [20, 40]


def test_evaluation_after_every_epoch_reports_best_and_last(toy, tmp_path, monkeypatch):
    run_dir = str(tmp_path)
    assert run_in_process(monkeypatch, toy, run_dir, "train.max_steps=13", "train.eval_every_epochs=1",
                          "target.reported=last", "checkpoint.every_steps=100") == 0
    final = json.load(open(os.path.join(run_dir, "final.json")))
    assert [e["step"] for e in final["evals"]] == [6, 12, 13]  # 48 clips of 8 per update: 6 updates an epoch
    scores = [e["eval_accuracy"] for e in final["evals"]]
    assert final["last"] == final["value"] == scores[-1] and final["reported"] == "last"
    assert final["best"] == max(scores) and final["best_step"] == final["evals"][scores.index(max(scores))]["step"]


def sigterm_at(monkeypatch, n):
    original = ft._Engine.forward
    calls = [0]

    def forward(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ft._Engine, "forward", forward)


RECIPE = ["train.max_steps=6", "train.eval_every_steps=2", "augment.noise=true", "model.drop_path=0.1"]


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_resume_is_bitwise_identical(task, toy, toy_multilabel, pretrained, tmp_path, monkeypatch):
    """The full recipe (mixup, masks, roll, noise, drop path, layer decay) from a pretraining
    checkpoint, with 2 micro batches per update: interrupted by SIGTERM at update 3 and resumed,
    it logs the same losses and evaluation scores as the uninterrupted run, bit for bit."""
    task_dir = toy if task == "multiclass" else toy_multilabel
    extra = [*RECIPE, f"data.task={task}", f"model.init_from={pretrained}"]
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    assert run_in_process(monkeypatch, task_dir, straight, *extra) == 0
    assert len(train_losses(straight)) == 6 and [e["step"] for e in eval_lines(straight)] == [2, 4, 6]
    assert any(line.get("mixup_lambda", 1.0) < 1.0 for line in lines(straight))
    sigterm_at(monkeypatch, 5)  # the first micro batch of update 3
    assert run_in_process(monkeypatch, task_dir, interrupted, *extra) == 0
    assert sorted(train_losses(interrupted)) == [1, 2, 3] and not os.path.exists(os.path.join(interrupted, "final.json"))
    monkeypatch.undo()
    assert run_in_process(monkeypatch, task_dir, interrupted, *extra) == 0
    assert train_losses(interrupted) == train_losses(straight)
    assert eval_lines(interrupted) == eval_lines(straight)
    a = json.load(open(os.path.join(straight, "final.json")))
    b = json.load(open(os.path.join(interrupted, "final.json")))
    assert a["value"] == b["value"] and a["metric"] == ("mAP" if task == "multilabel" else "accuracy")


@pytest.mark.slow
def test_two_process_bf16_zero2_run(toy_multilabel, tmp_path):
    run_dir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(REPO, "sslam_fast", "finetune.py"),
           *tiny(toy_multilabel, run_dir, "data.task=multilabel", "train.precision=bf16", "train.max_micro_batch=2",
                 "train.max_steps=2", "deepspeed.zero_stage=2")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes x 2 accumulation x 2 clips" in done.stderr
    assert sorted(os.listdir(os.path.join(run_dir, "step_000000002"))) == ["checksums.json", "deepspeed", "rank_0.pt",
                                                                          "rank_1.pt", "train.pt"]
    assert json.load(open(os.path.join(run_dir, "final.json")))["metric"] == "mAP"


def test_mixup_and_loss_normaliser_span_the_global_batch(toy_multilabel, tmp_path, monkeypatch):
    """One update is a function of the global batch, however it is split: 2 micro batches of 4 clips
    log the losses and mixup lambdas of 1 micro batch of 8 (one lambda, the batch reversed as a
    whole, the summed loss divided by the sum of the targets of all 8 clips)."""
    logged = {}
    for micro in (4, 8):
        run_dir = str(tmp_path / str(micro))
        assert run_in_process(monkeypatch, toy_multilabel, run_dir, "data.task=multilabel", "train.max_steps=3",
                              f"train.max_micro_batch={micro}", "augment.mixup_prob=1.0", "model.drop_path=0",
                              "checkpoint.every_steps=100") == 0
        logged[micro] = [line for line in lines(run_dir) if "loss" in line]
    assert [line["mixup_lambda"] for line in logged[4]] == [line["mixup_lambda"] for line in logged[8]]
    assert all(0 < line["mixup_lambda"] < 1 for line in logged[4])
    assert [line["loss"] for line in logged[4]] == pytest.approx([line["loss"] for line in logged[8]], rel=1e-5)


def test_init_checkpoint_with_other_statistics_is_warned_about(toy, pretrained, tmp_path, monkeypatch, caplog):
    """The init checkpoint states AudioSet's statistics; a run normalising otherwise says so, once."""
    def warnings_of(run_dir, *extra):
        caplog.clear()
        assert run_in_process(monkeypatch, toy, str(tmp_path / run_dir), f"model.init_from={pretrained}",
                              "train.max_steps=1", "checkpoint.every_steps=100", *extra) == 0
        return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "pretrained on fbanks" in r.getMessage()]

    assert warnings_of("same") == []
    (message,) = warnings_of("other", "data.norm_mean=-6.5", "data.norm_std=3.25")
    assert "mean -4.268 std 4.569" in message and "data.norm_mean=-6.5 data.norm_std=3.25" in message


def test_linear_evaluation_trains_only_the_head(toy, pretrained, tmp_path, monkeypatch):
    run_dir = str(tmp_path)
    assert run_in_process(monkeypatch, toy, run_dir, "train.max_steps=3", "model.freeze_encoder=true",
                          f"model.init_from={pretrained}", "train.epochs=0") == 0
    saved = torch.load(glob.glob(os.path.join(run_dir, "step_*", "train.pt"))[-1], weights_only=True)["model"]
    initial = torch.load(pretrained, weights_only=True)["student"]
    assert all(torch.equal(saved[f"encoder.{k}"], v) for k, v in initial.items())
    assert not torch.equal(saved["head_norm.weight"], torch.ones_like(saved["head_norm.weight"]))


def test_epochs_set_the_number_of_updates(toy, tmp_path, monkeypatch):
    run_dir = str(tmp_path)
    assert run_in_process(monkeypatch, toy, run_dir, "train.epochs=1", "train.max_steps=0",
                          "checkpoint.every_steps=100") == 0
    assert sorted(train_losses(run_dir)) == list(range(1, 48 // 8 + 1))


def test_runs_repeat_the_recipe_and_summarise(toy, tmp_path, monkeypatch):
    parent = tmp_path / "folds"
    for fold in ("1", "2"):
        os.makedirs(parent, exist_ok=True)
        os.symlink(toy, parent / f"fold{fold}")
    run_dir = str(tmp_path / "runs")
    assert run_in_process(monkeypatch, str(parent / "fold{run}"), run_dir, "train.max_steps=2", "runs=[\"1\", \"2\"]",
                          "target.published={\"mean\": 96.2}", "target.metric=accuracy") == 0
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert sorted(summary["runs"]) == ["1", "2"] and summary["published"] == {"mean": 96.2}
    finals = [json.load(open(os.path.join(run_dir, fold, "final.json"))) for fold in ("1", "2")]
    assert summary["reported"] == "best" and [f["value"] for f in finals] == [f["best"] for f in finals]
    assert summary["mean"] == pytest.approx(np.mean(list(summary["runs"].values())))
    assert summary["mean"] == summary["mean_best"] == pytest.approx(np.mean([f["best"] for f in finals]))
    assert summary["mean_last"] == pytest.approx(np.mean([f["last"] for f in finals]))


def test_config_errors(toy, tmp_path, monkeypatch, caplog):
    assert run_in_process(monkeypatch, toy, str(tmp_path), "model.bogus=1") == 1
    assert "unknown key 'bogus'" in caplog.text
    assert run_in_process(monkeypatch, str(tmp_path / "missing"), str(tmp_path), "data.task=other") == 1
    assert "data.task" in caplog.text
    assert run_in_process(monkeypatch, str(tmp_path / "missing"), str(tmp_path)) == 1
    assert "data error" in caplog.text and "missing" in caplog.text


# ----------------------------------------------------------------------------------------------
# The balanced-weights command and the shipped configs
# ----------------------------------------------------------------------------------------------


def test_balanced_weights_command_on_a_hand_made_label_file(tmp_path, capsys):
    with open(tmp_path / "label_descriptors.csv", "w") as f:
        f.write("0,/m/dog,Dog\n1,/m/cat,Cat\n2,/m/car,Car\n")
    with open(tmp_path / "train.lbl", "w") as f:
        f.write("a\t/m/dog\nb\t/m/dog,/m/cat\nc\t/m/dog\nd\t/m/car,/m/dog\n")
    out = str(tmp_path / "weights.csv")
    assert cli.main(["balanced-weights", str(tmp_path / "train.lbl"), "-o", out]) == 0
    assert "4 clip weights" in capsys.readouterr().out
    dog, cat, car = 1000 / 4.01, 1000 / 1.01, 1000 / 1.01  # 1000 / (count + 0.01)
    expected = [dog, dog + cat, dog, car + dog]
    assert read_weights(out) == pytest.approx(expected, rel=1e-15)
    assert open(out).read().splitlines()[0] == f"{dog:.18e}"  # numpy savetxt's layout, as the original
    assert np.array_equal(read_weights(out), balanced_weights(str(tmp_path / "train.lbl")))


def test_a_partial_section_keeps_the_fine_tuning_defaults():
    cfg = ft.load_finetune_config(None, ["data.dir=x", "optim.lr=1e-3", "checkpoint.keep_last=1"])
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps, cfg.optim.clip_grad) == (1e-3, 1e-6, 4000, 1e6)
    assert (cfg.checkpoint.dir, cfg.checkpoint.every_steps) == ("runs/finetune", 5000)


CONFIGS = {
    "finetune_as20k.json": ("mAP", {"mean": 40.9}),
    "finetune_as2m.json": ("mAP", {"mean": 50.2}),
    "finetune_esc50.json": ("accuracy", {"mean": 96.2}),
    "finetune_spc2.json": ("accuracy", {"mean": 98.1}),
    "linear_spass.json": ("mAP", {"SQUARE": 64.2, "PARK": 64.2, "WATERFRONT": 59.5, "STREET": 67.4, "MARKET": 68.5}),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shipped_configs_load_and_name_their_published_score(name):
    cfg = ft.load_finetune_config(os.path.join(REPO, "configs", name))
    metric, published = CONFIGS[name]
    assert cfg.target.metric == metric and cfg.target.published == published and cfg.target.source
    assert cfg.data.task == ("multilabel" if metric == "mAP" else "multiclass")
    assert cfg.fidelity == "recipe" and not cfg.deviations() and cfg.data.min_samples == 10_000
    assert (cfg.train.eval_every_epochs, cfg.train.eval_every_steps) == (1, 0)  # the original's cadence
    assert cfg.target.reported == ("last" if name == "linear_spass.json" else "best") and "log" in cfg.target.source
    if name == "finetune_esc50.json":
        assert cfg.runs == ["1", "2", "3", "4", "5"] and "{run}" in cfg.data.dir
    if name == "linear_spass.json":
        assert cfg.model.freeze_encoder and sorted(cfg.runs) == sorted(published) and "{run}" in cfg.data.dir
    if name == "finetune_as2m.json":
        assert cfg.data.weights_file and cfg.data.samples_per_epoch == 200_000
