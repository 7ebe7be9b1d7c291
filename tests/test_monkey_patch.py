"""Swap-in API on foreign codebases: outputs and gradients unchanged after patching a live
instance (Triton path forced; the interpreter runs it on CPU), and the fused paths really ran
(the patched model's counters), at the models' real default configurations."""
import copy
from collections import namedtuple
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sslam_kernels import inverse_block_mask_reference
from sslam_kernels.monkey_patch import (FastPathFallback, apply_fused_ema_to_eat, apply_sslam_kernels_to_ast,
                                        apply_sslam_kernels_to_eat, apply_sslam_kernels_to_timm_vit,
                                        patch_report)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _assert_same(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _assert_same_grads(ref_model, model, tol=1e-5):
    """Every gradient equal up to ``tol`` relative to its largest element (sums of many terms)."""
    g_ref, g = _grads(ref_model), _grads(model)
    assert g_ref and g_ref.keys() == g.keys()
    for n in g_ref:
        scale = max(1.0, g_ref[n].abs().max().item())
        torch.testing.assert_close(g[n], g_ref[n], rtol=tol, atol=tol * scale, msg=n)


def _tiny_ast(transformers, **kwargs):
    cfg = transformers.ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_length=48, num_mel_bins=32,
                                 frequency_stride=10, time_stride=10, hidden_dropout_prob=0.0, **kwargs)
    torch.manual_seed(0)
    model = transformers.ASTModel(cfg).to(DEVICE)
    with torch.no_grad():  # the HF init leaves these at zero: make them count
        model.embeddings.position_embeddings.normal_()
        model.embeddings.cls_token.normal_()
        model.embeddings.distillation_token.normal_()
    return model


def test_hf_ast_unchanged_after_patching():
    transformers = pytest.importorskip("transformers")
    model = _tiny_ast(transformers)
    twin = copy.deepcopy(model)
    x = torch.randn(3, 48, 32, device=DEVICE)
    ref = model(x).last_hidden_state
    ref.square().sum().backward()
    report = apply_sslam_kernels_to_ast(twin, use_triton=True)
    out = twin(x).last_hidden_state
    out.square().sum().backward()
    assert report.counts() == {"embeddings.forward": {"fast": 1, "fallback": 0}}
    _assert_same(out, ref)
    _assert_same_grads(model, twin)
    assert hasattr(twin.embeddings, "_sslam_original_forward")
    assert not hasattr(model.embeddings, "_sslam_original_forward")  # the twin only


def test_patched_model_compiles_fullgraph():
    transformers = pytest.importorskip("transformers")
    model = _tiny_ast(transformers)
    apply_sslam_kernels_to_ast(model, use_triton=True)
    x = torch.randn(2, 48, 32, device=DEVICE)
    ref = model(x).last_hidden_state
    ref.square().sum().backward()
    g_ref = _grads(model)
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    out = torch.compile(model, fullgraph=True)(x).last_hidden_state
    out.square().sum().backward()
    _assert_same(out, ref)
    for n, g in _grads(model).items():
        _assert_same(g, g_ref[n], 1e-4)
    assert patch_report(model).counts()["embeddings.forward"] == {"fast": 2, "fallback": 0}


def _timm():
    try:
        import timm
    except Exception:  # its torchvision wheel does not load beside a local CPU torch build
        pytest.skip("timm does not import here")
    return timm


@pytest.mark.parametrize("kwargs", [{}, {"reg_tokens": 2}, {"no_embed_class": True, "reg_tokens": 1},
                                    {"class_token": False, "global_pool": "avg"}])
def test_timm_vit_unchanged_after_patching(kwargs):
    timm = _timm()
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=5, **kwargs).to(DEVICE)
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    ref = model(x)
    ref.square().sum().backward()
    report = apply_sslam_kernels_to_timm_vit(twin, use_triton=True)
    out = twin(x)
    out.square().sum().backward()
    assert report.counts() == {"_pos_embed": {"fast": 1, "fallback": 0}}
    _assert_same(out, ref)
    _assert_same_grads(model, twin)


def test_timm_vit_resampled_table_falls_back():
    timm = _timm()
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=4, num_classes=5,
        dynamic_img_size=True).to(DEVICE)
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 48, 40, device=DEVICE)  # another grid: timm interpolates the table
    report = apply_sslam_kernels_to_timm_vit(twin, use_triton=True)
    _assert_same(twin(x), model(x), 0)
    assert report.counts() == {"_pos_embed": {"fast": 0, "fallback": 1}}
    apply_sslam_kernels_to_timm_vit(twin, use_triton=True, strict=True)
    with pytest.raises(FastPathFallback, match="dynamic_img_size"):
        twin(x)


# A compact model with the module structure and method contracts of fairseq data2vec 2.0 as EAT /
# SSLAM use it (ImageEncoder(ModalitySpecificEncoder) + Data2VecMultiModel + EMAModule), written
# for this test, at the authors' default configuration (pretraining_AS2M.yaml on top of the
# dataclass defaults): 1024 x 128 fbank in 16 x 16 patches (64 x 8 = 512 patches), a fixed table
# built for max_length 768 (6144 rows) and sliced to the input, one extra token, inverse block
# masks (mask_prob 0.8, length 5, adjust 0.07) precomputed, clone_batch 16, the CNN decoder
# (6 layers, kernel 3, 16 groups, residual, no input dropout), targets: instance norm per layer,
# average of all layers, LayerNorm. Only the widths and the depth are scaled down.
MaskInfo = namedtuple("MaskInfo", ["x_unmasked", "mask", "ids_restore", "ids_keep"])
MODALITY_CFG = dict(num_extra_tokens=1, init_extra_token_zero=False, mask_noise_std=0.01, mask_prob=0.8,
                    inverse_mask=True, mask_prob_adjust=0.07, mask_length=5, keep_masked_pct=0.0,
                    prenet_depth=0, use_alibi_encoder=False, ema_local_encoder=True, in_chans=1,
                    patch_size=16, target_length=1024, max_length=768, fixed_positions=True)
DECODER_CFG = dict(decoder_kernel=3, decoder_groups=16, decoder_layers=6, input_dropout=0.0,
                   add_positions_masked=False, add_positions_all=False, decoder_residual=True)
MODEL_CFG = dict(clone_batch=16, instance_norm_target_layer=True, batch_norm_target_layer=False,
                 layer_norm_target_layer=False, layer_norm_targets=True, instance_norm_targets=False,
                 layer_norm_first=False)
DIM, DEPTH, FREQ_PATCHES = 32, 3, 8


class FixedPositionalEncoder(nn.Module):
    def __init__(self, positions):
        super().__init__()
        self.positions = positions

    def forward(self, x, padding_mask):
        return self.positions


class PatchEmbed(nn.Module):
    def __init__(self, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(1, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class BlockEncoder(nn.Module):
    """prenet_depth 0: no blocks, the LayerNorm of a post-LN (layer_norm_first False) model."""

    def __init__(self, dim):
        super().__init__()
        self.blocks = nn.ModuleList()
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x, padding_mask, alibi_bias, alibi_scale):
        return self.norm(x)


class Decoder2d(nn.Module):
    def __init__(self, cfg, dim, h, w):
        super().__init__()
        self.cfg, self.h, self.w = cfg, h, w
        self.blocks = nn.ModuleList(
            nn.Conv2d(dim, cfg.decoder_dim, cfg.decoder_kernel, padding=cfg.decoder_kernel // 2,
                      groups=cfg.decoder_groups) for _ in range(cfg.decoder_layers))
        self.proj = nn.Linear(cfg.decoder_dim, dim)

    def forward(self, x, mask_info):
        B, T, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, self.h, self.w)
        residual = x
        for conv in self.blocks:
            x = F.gelu(F.layer_norm(conv(x).transpose(1, 3), (self.cfg.decoder_dim,)).transpose(1, 3))
            if self.cfg.decoder_residual and residual.size(1) == x.size(1):
                x = x + residual
            residual = x
        return self.proj(x.reshape(B, -1, T).transpose(1, 2))


class ImageEncoder(nn.Module):
    """data2vec 2.0's ModalitySpecificEncoder as EAT's ImageEncoder builds it (no padding, no ALiBi)."""

    def __init__(self, dim, positions=None):
        super().__init__()
        cfg = self.modality_cfg = SimpleNamespace(**MODALITY_CFG, decoder=SimpleNamespace(**DECODER_CFG,
                                                                                          decoder_dim=dim))
        self.H = cfg.target_length // cfg.patch_size
        self.W = 128 // cfg.patch_size
        self.local_encoder = PatchEmbed(dim, cfg.patch_size)
        self.project_features = nn.Identity()
        if positions is None:
            positions = torch.randn(1, cfg.max_length * self.W, dim)
        self.fixed_positional_encoder = FixedPositionalEncoder(nn.Parameter(positions, requires_grad=False))
        self.relative_positional_encoder = None
        self.get_alibi_bias = None
        self.alibi_scale = None
        self.extra_tokens = nn.Parameter(torch.randn(1, cfg.num_extra_tokens, dim))
        self.context_encoder = BlockEncoder(dim)
        self.decoder = Decoder2d(cfg.decoder, dim, self.H, self.W)

    def make_maskinfo(self, x, mask, shape=None):
        B, T, D = x.shape if shape is None else shape
        mask = mask.to(torch.uint8)
        ids_shuffle = mask.argsort(dim=1)
        ids_restore = ids_shuffle.argsort(dim=1).unsqueeze(-1).expand(-1, -1, D)
        ids_keep = ids_shuffle[:, :T - int(mask[0].sum())]
        x_unmasked = None
        if shape is None:
            ids_keep = ids_keep.unsqueeze(-1).expand(-1, -1, D)
            x_unmasked = torch.gather(x, 1, ids_keep)
        return MaskInfo(x_unmasked, mask, ids_restore, ids_keep)

    def contextualized_features(self, x, padding_mask, mask, remove_masked, clone_batch=1,
                                mask_seeds=None, precomputed_mask=None):
        local_features = x.clone() if mask and clone_batch == 1 else x
        x = x + self.fixed_positional_encoder(x, padding_mask)[:, :x.size(1), :]
        mask_info = None
        if mask:
            x = x.repeat_interleave(clone_batch, 0)
            mask_info = self.make_maskinfo(x, precomputed_mask)
            if remove_masked:
                x = mask_info.x_unmasked
        x = torch.cat([self.extra_tokens.expand(x.size(0), -1, -1), x], dim=1)
        return {"x": self.context_encoder(x, None, None, None), "local_features": local_features,
                "padding_mask": None, "alibi_bias": None, "alibi_scale": None, "encoder_mask": mask_info}

    def decoder_input(self, x, mask_info):
        num_extra = self.modality_cfg.num_extra_tokens
        if mask_info is None:
            return x[:, num_extra:], mask_info
        num_masked = mask_info.ids_restore.shape[1] - x.shape[1] + num_extra
        tokens = x.new_empty(x.size(0), num_masked, x.size(-1)).normal_(0, self.modality_cfg.mask_noise_std)
        x_ = torch.cat([x[:, num_extra:], tokens], dim=1)
        return torch.gather(x_, 1, mask_info.ids_restore), mask_info

    def forward(self, features, padding_mask, mask, remove_masked, clone_batch=1, mask_seeds=None,
                precomputed_mask=None):
        return self.contextualized_features(self.project_features(self.local_encoder(features)), padding_mask,
                                            mask, remove_masked, clone_batch, mask_seeds, precomputed_mask)


class AltBlock(nn.Module):
    """Post-LN block returning (x, the MLP output) as data2vec 2.0's AltBlock with ffn targets."""

    def __init__(self, dim):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, padding_mask=None, alibi_bias=None):
        x = self.norm1(x + self.attn(x, x, x, need_weights=False)[0])
        r = self.mlp(x)
        return self.norm2(x + r), r


class EMAModule:
    """fairseq's EMAModule as data2vec 2.0 builds it (ema_fp32): not an nn.Module, so the teacher
    is not a submodule of the student."""

    def __init__(self, model, decay):
        self.model, self.decay = model, decay
        self.config = SimpleNamespace(ema_fp32=True)
        self.fp32_params = {k: v.float().clone() for k, v in model.state_dict().items()}

    def get_decay(self):
        return self.decay

    def restore(self, state_dict, build_fp32_params=False):
        self.model.load_state_dict(state_dict, strict=False)


class Data2VecMultiModel(nn.Module):
    def __init__(self, dim=DIM, depth=DEPTH, skip_ema=False, positions=None, **cfg):
        super().__init__()
        self.cfg = SimpleNamespace(**{**MODEL_CFG, **cfg}, average_top_k_layers=depth)
        self.modality_encoders = nn.ModuleDict({"IMAGE": ImageEncoder(dim, positions)})
        self.blocks = nn.ModuleList(AltBlock(dim) for _ in range(depth))
        self.ema = None
        if not skip_ema:
            teacher = copy.deepcopy(self)  # make_target_model: the same weights, no decoder, frozen
            teacher.modality_encoders["IMAGE"].decoder = None
            teacher.requires_grad_(False)
            self.ema = EMAModule(teacher, 0.9998)

    def make_targets(self, y, num_layers):
        with torch.no_grad():
            layers = [F.instance_norm(t.float().transpose(1, 2)).transpose(1, 2) for t in y[-num_layers:]]
        y = layers[0].float()
        for t in layers[1:]:
            y.add_(t.float())
        y = y.div_(len(layers))
        return F.layer_norm(y, y.shape[-1:])

    def forward(self, source, precomputed_mask):
        enc = self.modality_encoders["IMAGE"]
        out = enc(source, None, True, True, self.cfg.clone_batch, None, precomputed_mask)
        x = out["x"]
        for blk in self.blocks:
            x, _ = blk(x)
        dx = enc.decoder(*enc.decoder_input(x, out["encoder_mask"]))
        with torch.no_grad():
            tm = self.ema.model
            t = tm.modality_encoders["IMAGE"](source, None, mask=False, remove_masked=False)["x"]
            extra = enc.modality_cfg.num_extra_tokens
            layers = []
            for blk in tm.blocks:
                t, lr = blk(t)
                layers.append(lr[:, extra:])
            y = self.make_targets(layers, self.cfg.average_top_k_layers).repeat_interleave(self.cfg.clone_batch, 0)
        masked = out["encoder_mask"].mask.bool()
        cls_target = y.mean(1)
        loss = F.mse_loss(dx[masked], y[masked], reduction="sum") + F.mse_loss(x[:, 0], cls_target, reduction="sum")
        return loss, dx


def _eat_batch(views, seed=1):
    gen = torch.Generator().manual_seed(seed)
    source = torch.randn(views // MODEL_CFG["clone_batch"], 1, 1024, 128, generator=gen).to(DEVICE)
    mask = inverse_block_mask_reference(views, (64, FREQ_PATCHES), 0.8, 5, 0.07, generator=gen).to(DEVICE)
    return source, mask


def _patched_twin(model, **kwargs):
    twin = copy.deepcopy(model)
    return twin, apply_sslam_kernels_to_eat(twin, **kwargs), apply_sslam_kernels_to_eat(twin.ema.model, **kwargs)


def test_eat_model_at_its_default_configuration_unchanged_and_fused():
    torch.manual_seed(0)
    model = Data2VecMultiModel().to(DEVICE)
    assert model.modality_encoders["IMAGE"].fixed_positional_encoder.positions.shape == (1, 6144, DIM)
    twin, report, teacher_report = _patched_twin(model, use_triton=True)
    source, mask = _eat_batch(2 * 16)
    torch.manual_seed(2)
    loss_ref, dx_ref = model(source, mask)
    loss_ref.backward()
    torch.manual_seed(2)  # the decoder noise is drawn identically
    loss, dx = twin(source, mask)
    loss.backward()
    assert report.counts() == {
        "modality_encoders.IMAGE.contextualized_features": {"fast": 1, "fallback": 0},
        "modality_encoders.IMAGE.decoder_input": {"fast": 1, "fallback": 0},
        "make_targets": {"fast": 1, "fallback": 0}}
    assert teacher_report.counts()["modality_encoders.IMAGE.contextualized_features"] == {"fast": 1, "fallback": 0}
    _assert_same(dx, dx_ref)
    _assert_same(loss, loss_ref, 1e-4)
    _assert_same_grads(model, twin)


def test_fused_ema_step_on_the_eat_model_copies_the_fixed_positions():
    torch.manual_seed(0)
    model = Data2VecMultiModel().to(DEVICE)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # a student that has moved away from its teacher
    ema = model.ema
    decay = ema.get_decay()
    student = dict(model.named_parameters())
    expected = {}
    for n, t in ema.fp32_params.items():
        s = student[n].detach().float()
        expected[n] = s.clone() if not student[n].requires_grad else t * decay + s * (1 - decay)
    apply_fused_ema_to_eat(model, backend="triton")
    ema.step(model)
    teacher = ema.model.state_dict()
    assert expected.keys() == {n for n in student if not n.startswith("modality_encoders.IMAGE.decoder.")}
    for n, e in expected.items():
        _assert_same(ema.fp32_params[n], e, 1e-6)
        _assert_same(teacher[n], e, 1e-6)
    key = "modality_encoders.IMAGE.fixed_positional_encoder.positions"
    _assert_same(teacher[key], student[key].detach(), 0)


def test_uncovered_shapes_fall_back_count_and_raise_when_strict():
    torch.manual_seed(0)
    clips, clone = 2, MODEL_CFG["clone_batch"]
    model = Data2VecMultiModel(positions=torch.randn(clips, 768 * FREQ_PATCHES, DIM)).to(DEVICE)  # per clip
    twin, report, teacher_report = _patched_twin(model, use_triton=True)
    source, mask = _eat_batch(clips * clone)
    torch.manual_seed(2)
    loss_ref, _ = model(source, mask)
    torch.manual_seed(2)
    loss, _ = twin(source, mask)
    _assert_same(loss, loss_ref, 1e-4)
    counts = report.counts()
    assert counts["modality_encoders.IMAGE.contextualized_features"] == {"fast": 0, "fallback": 1}
    assert counts["modality_encoders.IMAGE.decoder_input"] == {"fast": 1, "fallback": 0}
    assert teacher_report.counts()["modality_encoders.IMAGE.contextualized_features"] == {"fast": 0, "fallback": 1}
    assert "positional table (2, 6144, 32)" in str(report)
    enc = twin.modality_encoders["IMAGE"]
    x = torch.randn(clips, 512, DIM, device=DEVICE)
    with pytest.raises(FastPathFallback):  # patching again with strict=True keeps the counters
        apply_sslam_kernels_to_eat(twin, use_triton=True, strict=True)
        enc.contextualized_features(x, None, True, True, clone, None, mask)
    assert report.counts()["modality_encoders.IMAGE.contextualized_features"]["fallback"] == 2
    twin.cfg.layer_norm_targets = False
    layers = [torch.randn(clips, 512, DIM, device=DEVICE) for _ in range(2)]
    with pytest.raises(FastPathFallback, match="target normalisation"):
        twin.make_targets(layers, 2)


def test_other_eat_paths_fall_back_to_the_original():
    torch.manual_seed(0)
    model = Data2VecMultiModel(skip_ema=True).to(DEVICE)
    report = apply_sslam_kernels_to_eat(model, use_triton=True)
    enc = model.modality_encoders["IMAGE"]
    x = torch.randn(2, 512, DIM, device=DEVICE)
    padding = torch.zeros(2, 512, dtype=torch.bool, device=DEVICE)
    out = enc.contextualized_features(x, padding, False, False)
    _assert_same(out["x"], enc._sslam_original_contextualized_features(x, padding, False, False)["x"], 0)
    model.cfg.layer_norm_targets = False
    layers = [torch.randn(2, 512, DIM, device=DEVICE) for _ in range(2)]
    _assert_same(model.make_targets(layers, 2), model._sslam_original_make_targets(layers, 2), 0)
    assert report.reasons() == {
        "modality_encoders.IMAGE.contextualized_features": {"padding mask": 1},
        "make_targets": {"target normalisation other than EAT's (instance norm per layer, LayerNorm of the "
                         "average)": 1}}
