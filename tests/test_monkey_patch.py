"""Swap-in API on foreign codebases: outputs and gradients unchanged after patching a live
instance (Triton path forced; the interpreter runs it on CPU)."""
import copy
from collections import namedtuple
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sslam_kernels.monkey_patch as monkey_patch_module
from sslam_kernels.monkey_patch import (apply_fused_ema, apply_sslam_kernels_to_ast,
                                        apply_sslam_kernels_to_eat, apply_sslam_kernels_to_timm_vit)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _assert_same(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_hf_ast_unchanged_after_patching(monkeypatch):
    calls = _count_calls(monkeypatch, ["embed_mask_gather"])
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_length=48, num_mel_bins=32,
                                 frequency_stride=10, time_stride=10, hidden_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.ASTModel(cfg).to(DEVICE)
    with torch.no_grad():  # the HF init leaves these at zero: make them count
        model.embeddings.position_embeddings.normal_()
        model.embeddings.cls_token.normal_()
        model.embeddings.distillation_token.normal_()
    twin = copy.deepcopy(model)
    x = torch.randn(3, 48, 32, device=DEVICE)
    ref = model(x).last_hidden_state
    ref.square().sum().backward()
    apply_sslam_kernels_to_ast(twin, use_triton=True)
    out = twin(x).last_hidden_state
    out.square().sum().backward()
    assert calls["embed_mask_gather"] == 1
    _assert_same(out, ref)
    g_ref, g_out = _grads(model), _grads(twin)
    assert g_ref.keys() == g_out.keys()
    for n in g_ref:
        _assert_same(g_out[n], g_ref[n], 1e-4)
    assert hasattr(twin.embeddings, "_sslam_original_forward")
    assert not hasattr(model.embeddings, "_sslam_original_forward")  # the twin only


def _timm():
    try:
        import timm
    except Exception:  # its torchvision wheel does not load beside a local CPU torch build
        pytest.skip("timm does not import here")
    return timm


@pytest.mark.parametrize("kwargs", [{}, {"reg_tokens": 2}, {"no_embed_class": True, "reg_tokens": 1},
                                    {"class_token": False, "global_pool": "avg"}])
def test_timm_vit_unchanged_after_patching(kwargs, monkeypatch):
    timm = _timm()
    calls = _count_calls(monkeypatch, ["embed_mask_gather"])
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=5, **kwargs).to(DEVICE)
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    ref = model(x)
    ref.square().sum().backward()
    apply_sslam_kernels_to_timm_vit(twin, use_triton=True)
    out = twin(x)
    out.square().sum().backward()
    assert calls["embed_mask_gather"] == 1
    _assert_same(out, ref)
    g_ref, g_out = _grads(model), _grads(twin)
    for n in g_ref:
        _assert_same(g_out[n], g_ref[n], 1e-4)


# A compact model with fairseq data2vec 2.0 / EAT's module structure and method contracts
# (ModalitySpecificEncoder + Data2VecMultiModel), written from docs/method.md §3 for this test.
MaskInfo = namedtuple("MaskInfo", ["x_unmasked", "mask", "ids_restore", "ids_keep"])


class FixedPositionalEncoder(nn.Module):
    def __init__(self, positions):
        super().__init__()
        self.positions = positions

    def forward(self, x, padding_mask):
        return self.positions


class ContextEncoder(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x, padding_mask, alibi_bias, alibi_scale):
        return self.norm(x)


class PatchEmbed(nn.Module):
    def __init__(self, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(1, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class ModalityEncoder(nn.Module):
    """The masked path of data2vec 2.0's ModalitySpecificEncoder (no padding, no ALiBi)."""

    def __init__(self, dim, patch, grid):
        super().__init__()
        self.modality_cfg = SimpleNamespace(num_extra_tokens=1, mask_noise_std=0.01, keep_masked_pct=0.0,
                                            decoder=SimpleNamespace(input_dropout=0.0, add_positions_masked=False,
                                                                    add_positions_all=False))
        self.local_encoder = PatchEmbed(dim, patch)
        self.project_features = nn.Identity()
        self.fixed_positional_encoder = FixedPositionalEncoder(
            nn.Parameter(torch.randn(1, grid[0] * grid[1], dim), requires_grad=False))
        self.relative_positional_encoder = None
        self.get_alibi_bias = None
        self.alibi_scale = None
        self.extra_tokens = nn.Parameter(torch.randn(1, 1, dim))
        self.context_encoder = ContextEncoder(dim)
        self.decoder = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

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
        x = x + self.fixed_positional_encoder(x, padding_mask)
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
        num_masked = mask_info.ids_restore.shape[1] - x.shape[1] + num_extra
        tokens = x.new_empty(x.size(0), num_masked, x.size(-1)).normal_(0, self.modality_cfg.mask_noise_std)
        x_ = torch.cat([x[:, num_extra:], tokens], dim=1)
        return torch.gather(x_, 1, mask_info.ids_restore), mask_info

    def forward(self, features, padding_mask, mask, remove_masked, clone_batch=1, mask_seeds=None,
                precomputed_mask=None):
        return self.contextualized_features(self.local_encoder(features), padding_mask, mask, remove_masked,
                                            clone_batch, mask_seeds, precomputed_mask)


class AltBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, padding_mask=None, alibi_bias=None):
        x = self.norm1(x + self.attn(x, x, x, need_weights=False)[0])
        r = self.mlp(x)
        return self.norm2(x + r), r


class D2VModel(nn.Module):
    def __init__(self, dim=32, patch=4, grid=(6, 3), depth=3, clone_batch=3):
        super().__init__()
        self.cfg = SimpleNamespace(instance_norm_target_layer=True, batch_norm_target_layer=False,
                                   layer_norm_target_layer=False, layer_norm_targets=True,
                                   instance_norm_targets=False, clone_batch=clone_batch)
        self.modality_encoders = nn.ModuleDict({"IMAGE": ModalityEncoder(dim, patch, grid)})
        self.blocks = nn.ModuleList(AltBlock(dim) for _ in range(depth))

    def make_targets(self, y, num_layers):
        y = [F.instance_norm(t.float().transpose(1, 2)).transpose(1, 2) for t in y[-num_layers:]]
        y = sum(y) / len(y)
        return F.layer_norm(y, y.shape[-1:])

    def forward(self, source, precomputed_mask, teacher):
        enc = self.modality_encoders["IMAGE"]
        out = enc(source, None, True, True, self.cfg.clone_batch, None, precomputed_mask)
        x = out["x"]
        for blk in self.blocks:
            x, _ = blk(x)
        dx = enc.decoder(enc.decoder_input(x, out["encoder_mask"])[0])
        with torch.no_grad():
            t_enc = teacher.modality_encoders["IMAGE"]
            t = t_enc.contextualized_features(out["local_features"], None, False, False)["x"]
            layers = []
            for blk in teacher.blocks:
                t, r = blk(t)
                layers.append(r[:, 1:])
            y = teacher.make_targets(layers, len(layers)).repeat_interleave(self.cfg.clone_batch, 0)
        masked = out["encoder_mask"].mask.bool()
        return F.mse_loss(dx[masked], y[masked], reduction="sum") + x[:, 0].square().sum(), dx


def _count_calls(monkeypatch, names):
    calls = {n: 0 for n in names}
    for n in names:
        fn = getattr(monkey_patch_module, n)

        def counted(*a, _fn=fn, _n=n, **k):
            calls[_n] += 1
            return _fn(*a, **k)
        monkeypatch.setattr(monkey_patch_module, n, counted)
    return calls


def test_eat_style_model_unchanged_after_patching(monkeypatch):
    calls = _count_calls(monkeypatch, ["embed_mask_gather", "decoder_input_gather", "layer_averaged_target"])
    torch.manual_seed(0)
    student = D2VModel().to(DEVICE)
    teacher = copy.deepcopy(student)
    patched_student, patched_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    names = apply_sslam_kernels_to_eat(patched_student, use_triton=True)
    apply_sslam_kernels_to_eat(patched_teacher, use_triton=True)
    assert "modality_encoders.IMAGE.contextualized_features" in names and "make_targets" in names
    source = torch.randn(2, 1, 24, 12, device=DEVICE)
    V, P, K = 2 * 3, 18, 5
    mask = torch.ones(V, P, dtype=torch.bool, device=DEVICE)
    mask[torch.arange(V, device=DEVICE)[:, None], torch.stack([torch.randperm(P)[:K] for _ in range(V)]).to(DEVICE)] = False
    torch.manual_seed(1)
    loss_ref, dx_ref = student(source, mask, teacher)
    loss_ref.backward()
    torch.manual_seed(1)  # the decoder noise is drawn identically
    loss, dx = patched_student(source, mask, patched_teacher)
    loss.backward()
    assert calls == {"embed_mask_gather": 1, "decoder_input_gather": 1, "layer_averaged_target": 1}
    _assert_same(dx, dx_ref)
    _assert_same(loss, loss_ref, 1e-4)
    g_ref, g = _grads(student), _grads(patched_student)
    assert g_ref.keys() == g.keys()
    for n in g_ref:
        _assert_same(g[n], g_ref[n], 1e-4)
    # the EMA teacher, updated by the fused kernel, matches the per-tensor update
    expected = {n: p.detach() * 0.9 + dict(student.named_parameters())[n].detach() * 0.1
                for n, p in teacher.named_parameters()}
    apply_fused_ema(student, teacher, backend="triton").update(0.9)
    for n, p in teacher.named_parameters():
        _assert_same(p.detach(), expected[n], 1e-6)


def test_unpatched_paths_fall_back():
    torch.manual_seed(0)
    model = D2VModel().to(DEVICE)
    apply_sslam_kernels_to_eat(model, use_triton=True)
    enc = model.modality_encoders["IMAGE"]
    x = torch.randn(2, 18, 32, device=DEVICE)
    out = enc.contextualized_features(x, None, False, False)  # teacher path: the original code
    ref = enc._sslam_original_contextualized_features(x, None, False, False)
    _assert_same(out["x"], ref["x"], 0)
    model.cfg.layer_norm_targets = False
    layers = [torch.randn(2, 18, 32, device=DEVICE) for _ in range(2)]
    _assert_same(model.make_targets(layers, 2), model._sslam_original_make_targets(layers, 2), 0)
