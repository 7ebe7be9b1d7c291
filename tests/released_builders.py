"""Checkpoints in the original layouts, written key by key here (independently of
sslam_fast.released.formats), from a tiny in-memory model."""
import enum

import torch

from helpers import save_with_classes_of, tiny_model
from sslam_fast.model import sincos_table

ENC = "modality_encoders.IMAGE."
# A block's parameters in the order the original's files list them (tests/fixtures/parity_stage1).
ORIGINAL_BLOCK_ORDER = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                        "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                        "mlp.fc2.weight", "mlp.fc2.bias"]


def original_encoder_keys(encoder, dtype=None, decoder=None):
    """The encoder's original names in the original's order (the decoder's, if given, before the blocks)."""
    s = {k: (v.to(dtype) if dtype is not None else v) for k, v in encoder.state_dict().items()}
    c = encoder.cfg
    out = {
        ENC + "extra_tokens": s["cls_token"],
        ENC + "local_encoder.proj.weight": s["patch_embed.weight"],
        ENC + "local_encoder.proj.bias": s["patch_embed.bias"],
        ENC + "fixed_positional_encoder.positions": sincos_table(c.embed_dim, c.max_time_patches, c.freq_patches)[None],
        ENC + "context_encoder.norm.weight": s["norm.weight"],
        ENC + "context_encoder.norm.bias": s["norm.bias"],
    }
    out.update(decoder or {})
    for i in range(c.depth):
        for name in ORIGINAL_BLOCK_ORDER:
            out[f"blocks.{i}.{name}"] = s[f"blocks.{i}.{name}"]
    return out


def pretraining_cfg(c):
    return {"_name": None, "common": {"user_dir": "EAT"}, "task": {"_name": "mae_image_pretraining"}, "model": {
        "_name": "data2vec_multi", "embed_dim": c.embed_dim, "depth": c.depth, "num_heads": c.num_heads,
        "mlp_ratio": c.mlp_ratio, "norm_eps": c.norm_eps, "average_top_k_layers": c.average_top_k_layers,
        "clone_batch": c.clone_batch, "cls_loss": 1.0,
        "modalities": {"_name": None, "image": {
            "patch_size": c.patch_size, "max_length": c.max_time_patches, "mask_prob": c.mask_prob,
            "decoder": {"decoder_dim": c.embed_dim, "decoder_layers": c.decoder_layers,
                        "decoder_kernel": c.decoder_kernel, "decoder_groups": c.decoder_groups}}}}}


def original_pretraining(model, student_dtype=None):
    """{"cfg", "model"} as the original writes it: student (+ decoder) and the fp32 teacher in _ema."""
    d, decoder = model.decoder.state_dict(), {}
    for i in range(model.cfg.decoder_layers):
        decoder[ENC + f"decoder.blocks.{i}.0.weight"] = d[f"convs.{i}.weight"]
        decoder[ENC + f"decoder.blocks.{i}.0.bias"] = d[f"convs.{i}.bias"]
    decoder[ENC + "decoder.proj.weight"], decoder[ENC + "decoder.proj.bias"] = d["proj.weight"], d["proj.bias"]
    state = original_encoder_keys(model.student, student_dtype, decoder)
    state["_ema"] = original_encoder_keys(model.teacher, torch.float32)
    return {"args": None, "cfg": pretraining_cfg(model.cfg), "model": state, "criterion": None,
            "optimizer_history": [], "task_state": {}, "extra_state": {}}


class PredictionMode(enum.Enum):
    MEAN_POOLING = 1
    CLS_TOKEN = 2
    LIN_SOFTMAX = 3


PredictionMode.__module__ = "EAT.models.EAT_audio_classification"


def save_with_original_enum(obj, path):
    """torch.save with PredictionMode pickled as the original's ``EAT.models.EAT_audio_classification``."""
    save_with_classes_of(obj, path, "EAT.models.EAT_audio_classification", PredictionMode=PredictionMode)


def tiny_head(model, classes=527, seed=1, fc_norm=True):
    g = torch.Generator().manual_seed(seed)
    D = model.cfg.embed_dim
    head = {}  # the original module order: model, fc_norm, head
    if fc_norm:
        head["fc_norm.weight"] = 1 + 0.1 * torch.randn(D, generator=g)
        head["fc_norm.bias"] = 0.1 * torch.randn(D, generator=g)
    head["head.weight"] = torch.randn(classes, D, generator=g) * 0.3
    head["head.bias"] = torch.randn(classes, generator=g) * 0.1
    return head


def original_finetuned(model, head, mode=PredictionMode.CLS_TOKEN):
    """An original fine-tuned checkpoint: the encoder under "model.", fc_norm, head; cfg with
    pretrained_model_args and the prediction_mode enum."""
    state = {"model." + k: v for k, v in original_encoder_keys(model.student).items()}
    state.update(head)
    cfg = {"_name": None, "task": {"_name": "mae_image_classification"}, "model": {
        "_name": "mae_image_classification", "num_classes": head["head.weight"].shape[0],
        "use_fc_norm": "fc_norm.weight" in head, "prediction_mode": mode,
        "pretrained_model_args": pretraining_cfg(model.cfg)}}
    return {"args": None, "cfg": cfg, "model": state, "criterion": None, "optimizer_history": [],
            "task_state": {}, "extra_state": {}}


def reference_logits(model, head, fbank, pooling="cls", eps=1e-6):
    tokens = model.student(fbank)
    if pooling == "lin_softmax":  # p = sum(s^2) / sum(s) over the patches, s = sigmoid; back to a logit
        s = torch.sigmoid(tokens[:, 1:].double())
        p = (s * s).sum(1) / s.sum(1) * torch.exp(torch.tensor(-1e-6, dtype=torch.float64))
        x = torch.log(p / (1 - p)).float()
    else:
        x = tokens[:, 0] if pooling == "cls" else tokens[:, 1:].mean(1)
    if "fc_norm.weight" in head:
        x = torch.nn.functional.layer_norm(x, x.shape[-1:], head["fc_norm.weight"], head["fc_norm.bias"], eps)
    return x @ head["head.weight"].T + head["head.bias"]


def write_original_checkpoints(folder) -> dict:
    """A tiny model's original pretraining checkpoint and its original fine-tuned one (527-class
    head) in ``folder``: {"pretrain": path, "finetuned": path}."""
    model = tiny_model().eval()
    torch.save(original_pretraining(model), folder / "pretrain.pt")
    save_with_original_enum(original_finetuned(model, tiny_head(model)), folder / "finetuned.pt")
    return {"pretrain": str(folder / "pretrain.pt"), "finetuned": str(folder / "finetuned.pt")}
