import pytest
import torch

from sslam_fast import Draws, SSLAMConfig, SSLAMPretrainer
from sslam_fast.config import ConfigError, from_dict
from sslam_fast.mixing import mixed_rows
from sslam_fast.model import Encoder, count_parameters, sincos_table
from sslam_fast.teacher import ema_decay_at
from sslam_kernels import layer_averaged_target

from helpers import fbank_batch, tiny_config, tiny_model


def test_vit_base_parameter_count():
    model = SSLAMPretrainer(SSLAMConfig())
    n = count_parameters(model.student) + count_parameters(model.decoder)
    assert 85e6 < n < 90e6  # "88M parameters with decoder"
    assert all(not p.requires_grad for p in model.teacher.parameters())


def test_default_config_is_the_documented_vit_b_recipe():
    """SSLAMConfig() against the numbers of docs/method.md §3-7 (ViT-B; stage 2 sets clone_batch 8)."""
    c = SSLAMConfig()
    assert (c.stage, c.embed_dim, c.depth, c.num_heads, c.mlp_ratio, c.patch_size, c.num_mel_bins) == (1, 768, 12, 12, 4.0, 16, 128)
    assert (c.max_time_patches, c.norm_eps) == (768, 1e-6)
    assert (c.mask_prob, c.mask_length, c.mask_prob_adjust, c.clone_batch) == (0.8, 5, 0.07, 16)
    assert (c.decoder_layers, c.decoder_kernel, c.decoder_groups, c.decoder_norm_eps) == (6, 3, 16, 1e-5)
    assert c.mask_noise_std == 0.01
    assert (c.average_top_k_layers, c.instance_norm_eps, c.target_norm_eps) == (12, 1e-5, 1e-5)
    assert (c.loss_scale, c.cls_loss_weight, c.patch_loss_weight, c.srl_loss_weight) == (None, 1.0, 1.0, 2.0)
    assert (c.mix_window, c.mix_w1_max, c.mix_w2_max, c.mix_step) == (240, 496, 782, 16)
    assert (c.ema_decay, c.ema_end_decay, c.ema_anneal_end_step) == (0.9998, 0.99999, 100_000)


@pytest.mark.parametrize("size", ["base", "large"])
def test_feature_shapes_for_base_and_large(size):
    cfg = SSLAMConfig() if size == "base" else SSLAMConfig.large()
    enc = Encoder(cfg).eval()
    with torch.no_grad():
        x = fbank_batch(2, 128)
        assert enc.extract_features(x, "all").shape == (2, 1 + 64, cfg.embed_dim)
        assert enc.extract_features(x[:, 0], "frame").shape == (2, 64, cfg.embed_dim)
        assert enc.extract_features(x, "utterance").shape == (2, cfg.embed_dim)


@pytest.mark.parametrize("frames", [16, 128, 512, 1024, 12288])
def test_feature_lengths(frames):
    enc = Encoder(tiny_config()).eval()
    with torch.no_grad():
        out = enc.extract_features(fbank_batch(1, frames), "frame")
    assert out.shape == (1, frames // 16 * 8, 32)


@pytest.mark.parametrize("frames", [0, 100, 12288 + 16])
def test_feature_lengths_rejected(frames):
    enc = Encoder(tiny_config())
    with pytest.raises(ValueError, match="frames"):
        enc.extract_features(torch.zeros(1, frames, 128))
    with pytest.raises(ValueError, match="granularity"):
        enc.extract_features(torch.zeros(1, 32, 128), "clip")


def test_positional_table_layout():
    table = sincos_table(64, 768, 8)
    assert table.shape == (768 * 8, 64)
    # index = t * 8 + f; first half encodes frequency, second half time.
    t, f = 5, 3
    row = table[t * 8 + f]
    assert torch.allclose(row[:16], torch.sin(f / 10000 ** (torch.arange(16) / 16.0)), atol=1e-6)
    assert torch.allclose(row[48:], torch.cos(t / 10000 ** (torch.arange(16) / 16.0)), atol=1e-6)


@pytest.mark.parametrize("stage,frames", [(1, 128), (1, 512), (1, 1024), (2, 1024)])
def test_pretrainer_shapes_and_counts(stage, frames):
    model = tiny_model(stage=stage)
    out = model(fbank_batch(3, frames), generator=torch.Generator().manual_seed(0))
    views = 3 * 2 * (2 if stage == 2 else 1)
    P = frames // 16 * 8
    masks = out["draws"].masks
    assert masks.shape == (views, P)
    assert int(out["sample_size"]) == int(masks.sum()) == views * (P - int(P * 0.2))
    total = out["patch_loss"] + out["cls_loss"] + out["srl_loss"]
    assert torch.allclose(out["loss"].detach(), total / out["sample_size"])
    assert (out["srl_loss"] > 0) == (stage == 2)
    if stage == 2:
        assert torch.equal(masks[: views // 2], masks[views // 2:])
    assert out["target_var"] > 0.5 and out["pred_var"] > 0


def test_stage2_needs_room_for_the_windows():
    with pytest.raises(ValueError, match="do not fit"):
        tiny_model(stage=2)(fbank_batch(2, 512))


def test_same_draws_same_step_and_draws_are_used():
    model = tiny_model(stage=2)
    x = fbank_batch(3, 1024)
    a = model(x, generator=torch.Generator().manual_seed(0))
    b = model(x, draws=a["draws"])
    for k in ("loss", "patch_loss", "cls_loss", "srl_loss"):
        assert torch.equal(a[k], b[k]), k
    other = model(x, draws=Draws(masks=a["draws"].masks, mix_windows=a["draws"].mix_windows))
    assert not torch.equal(a["patch_loss"], other["patch_loss"])  # fresh noise changes the prediction
    with pytest.raises(ValueError, match="masks"):
        model(x, draws=Draws(masks=a["draws"].masks[:5]))
    with pytest.raises(ValueError, match="mix_windows"):
        model(x, draws=Draws(mix_windows=(8, 500)))


@pytest.mark.parametrize("std", [None, 0.05])
def test_decoder_noise_is_drawn_with_mask_noise_std(std):
    """docs/method.md §6: masked decoder inputs are N(0, 0.01) (SSLAMConfig.mask_noise_std)."""
    model = tiny_model(stage=1) if std is None else tiny_model(stage=1, mask_noise_std=std)
    if std is None:
        std = 0.01
        assert model.cfg.mask_noise_std == 0.01
    noise = model.draw(2, 1024, "cpu", torch.Generator().manual_seed(3)).decoder_noise.double()
    assert noise.shape == (2 * 2, 512, 32)
    n = noise.numel()  # 65536 draws: the sample std is within 0.3% of std at one sigma
    assert abs(float(noise.std()) / std - 1) < 0.02
    assert abs(float(noise.mean())) < 5 * std / n ** 0.5


def test_noise_matters_only_at_masked_positions():
    model = tiny_model(stage=1)
    x = fbank_batch(2, 256)
    a = model(x, generator=torch.Generator().manual_seed(0))
    noise = a["draws"].decoder_noise.clone()
    noise[~a["draws"].masks] = 123.0
    b = model(x, draws=Draws(masks=a["draws"].masks, decoder_noise=noise))
    assert torch.equal(a["loss"], b["loss"])


def test_teacher_gets_no_gradient_and_student_does():
    model = tiny_model(stage=2)
    out = model(fbank_batch(2, 1024), generator=torch.Generator().manual_seed(1))
    out["loss"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters())
    assert not model.teacher.training


def test_ema_schedule_and_update():
    model = tiny_model(ema_decay=0.9, ema_end_decay=0.99, ema_anneal_end_step=100)
    assert model.ema_decay(0) == pytest.approx(0.9)
    assert model.ema_decay(50) == pytest.approx(0.945)
    assert model.ema_decay(100) == model.ema_decay(10_000) == pytest.approx(0.99)
    defaults = SSLAMConfig()
    assert (defaults.ema_decay, defaults.ema_end_decay, defaults.ema_anneal_end_step) == (0.9998, 0.99999, 100_000)
    assert ema_decay_at(50_000, defaults.ema_decay, defaults.ema_end_decay, 100_000) == pytest.approx(0.999895, abs=1e-12)
    before = [p.clone() for p in model.teacher.parameters()]
    student = [p.detach().clone() for p in model.student.parameters()]
    decay = model.update_teacher(50)
    assert decay == pytest.approx(0.945)
    for t0, s, t1 in zip(before, student, model.teacher.parameters()):
        assert torch.allclose(t1, decay * t0 + (1 - decay) * s, atol=1e-6)
        assert t1.dtype == torch.float32


def test_teacher_unchanged_by_a_step_without_update():
    model = tiny_model()
    before = [p.clone() for p in model.teacher.parameters()]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(fbank_batch(2, 256), generator=torch.Generator().manual_seed(0))["loss"].backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.teacher.parameters()))


def test_source_retention_target():
    model = tiny_model(stage=2)
    x = fbank_batch(3, 1024, seed=4)
    windows = (32, 400)
    inputs = torch.cat([x, x.flip(0)])  # any second half: the SRL target only uses the originals
    grid = (64, 8)
    targets = model.teacher_targets(inputs, 3, windows, grid)
    own, srl = targets["patch"][:3], targets["srl"]
    rows = mixed_rows(64, windows, 240)
    # The partner's features: the teacher on the originals with the unmixed rows dropped.
    t = model.teacher
    with torch.no_grad():
        tokens = t.tokens(x)
        kept = tokens[:, 1:].view(3, 64, 8, -1)[:, rows].reshape(3, -1, 32)
        _, layers = t.run_blocks(torch.cat([tokens[:, :1], kept], dim=1), collect=True)
        partner = layer_averaged_target(layers).view(3, -1, 8, 32)
    own4, srl4 = own.view(3, 64, 8, 32), srl.view(3, 64, 8, 32)
    assert torch.equal(srl4[:, ~rows], own4[:, ~rows])
    for i in range(3):
        expected = (own4[i, rows] + partner[i - 1]) / 2
        assert torch.allclose(srl4[i, rows], expected, atol=1e-6)


def test_targets_normalisation():
    y = layer_averaged_target([torch.randn(2, 10, 16) * 3 + 1, torch.randn(2, 10, 16)])
    assert torch.allclose(y.mean(-1), torch.zeros(2, 10), atol=1e-5)
    assert torch.allclose(y.var(-1, unbiased=False), torch.ones(2, 10), atol=1e-3)


def test_config_rejects_unknown_and_bad_values():
    with pytest.raises(ConfigError, match="'embed_dimm'"):
        from_dict(SSLAMConfig, {"embed_dimm": 3}, "model")
    with pytest.raises(ConfigError, match="model.num_heads"):
        from_dict(SSLAMConfig, {"embed_dim": 30, "num_heads": 4}, "model")
    with pytest.raises(ConfigError, match="model.stage"):
        from_dict(SSLAMConfig, {"stage": 3}, "model")
    with pytest.raises(ConfigError, match="model.depth"):
        from_dict(SSLAMConfig, {"depth": "12"}, "model")
