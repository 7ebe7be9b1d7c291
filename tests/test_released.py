"""Released-model loaders and exports: original layouts in, identical features and tensors out."""
import json

import numpy as np
import pytest
import torch

import sslam_fast
from sslam_fast import CheckpointError, load_classifier, load_encoder, load_pretrainer, save_pretrainer
from sslam_fast.released.classes import audioset_classes
from sslam_fast.released.export import export
from sslam_fast.released.formats import finetuned_config

from helpers import fbank_batch, tiny_model
from released_builders import (PredictionMode, original_finetuned, original_pretraining, reference_logits,
                               save_with_original_enum, tiny_head)

X = fbank_batch(2, 160)[:, 0]  # [B, T, 128]


@pytest.fixture(scope="module")
def model():
    return tiny_model().eval()


@pytest.fixture(scope="module")
def pretraining_file(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("orig") / "checkpoint_last.pt"
    torch.save(original_pretraining(model), path)
    return path


@pytest.fixture(scope="module")
def finetuned_file(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("ft") / "checkpoint_best.pt"
    save_with_original_enum(original_finetuned(model, tiny_head(model)), path)
    return path


@torch.no_grad()
def features(encoder, x=X):
    return encoder(x)


def test_original_pretraining_student_and_teacher(model, pretraining_file):
    with torch.no_grad():
        student, teacher = model.student(X), model.teacher(X)
    assert not torch.equal(student, teacher)
    for which, want in (("student", student), ("teacher", teacher)):
        encoder = load_encoder(pretraining_file, which)
        assert not encoder.training and encoder.which == which
        assert torch.equal(features(encoder), want), which
        assert torch.equal(encoder.extract_features(X.unsqueeze(1), "utterance"), want[:, 0])
        assert torch.equal(encoder.extract_features(X, "frame"), want[:, 1:])
    assert load_encoder(pretraining_file).embed_dim == 32


def test_original_finetuned_logits(model, finetuned_file):
    classifier = load_classifier(finetuned_file)
    head = tiny_head(model)
    with torch.no_grad():
        want = reference_logits(model, head, X)
        assert torch.allclose(classifier(X), want, atol=1e-5, rtol=0)
        assert torch.equal(features(load_encoder(finetuned_file)), model.student(X))
    assert classifier.num_classes == 527 and classifier.labels[0] == "Speech" and classifier.pooling == "cls"
    with pytest.raises(CheckpointError, match="checkpoint_best.pt.*no teacher"):
        load_encoder(finetuned_file, "teacher")


@pytest.mark.parametrize("mode,pooling", [(PredictionMode.MEAN_POOLING, "mean"), (PredictionMode.LIN_SOFTMAX, "lin_softmax"),
                                          ("PredictionMode.CLS_TOKEN", "cls"), (2, "cls")])
def test_finetuned_prediction_modes_and_no_fc_norm(model, tmp_path, mode, pooling):
    head = tiny_head(model, classes=10, fc_norm=False)
    path = tmp_path / "ft.pt"
    save_with_original_enum(original_finetuned(model, head, mode), path)
    classifier = load_classifier(path)
    assert classifier.pooling == pooling and classifier.fc_norm is None and classifier.labels[3] == "class 3"
    with torch.no_grad():
        assert torch.allclose(classifier(X), reference_logits(model, head, X, pooling), atol=1e-4, rtol=0)


@pytest.mark.parametrize("size,dims", [("base", (768, 12, 12)), ("large", (1024, 24, 16))])
def test_finetuned_config_base_and_large(size, dims):
    embed, depth, heads = dims
    cfg = {"model": {"_name": "mae_image_classification", "num_classes": 527, "prediction_mode": "CLS_TOKEN",
                     "pretrained_model_args": {"model": {"embed_dim": embed, "depth": depth, "num_heads": heads,
                                                         "average_top_k_layers": depth,
                                                         "modalities": {"image": {"max_length": 768, "decoder": {"decoder_dim": embed}}}}}}}
    encoder, settings = finetuned_config(size, cfg)
    assert (encoder.embed_dim, encoder.depth, encoder.num_heads) == dims
    assert settings == {"use_fc_norm": True, "pooling": "cls", "num_classes": 527}


def test_pretraining_checkpoint_has_no_head(pretraining_file):
    with pytest.raises(CheckpointError, match="checkpoint_last.pt.*no classification head"):
        load_classifier(pretraining_file)


def test_our_formats_load(model, tmp_path):
    save_pretrainer(model, str(tmp_path / "ours.pt"))
    for which in ("student", "teacher"):
        with torch.no_grad():
            assert torch.equal(features(load_encoder(tmp_path / "ours.pt", which)), getattr(model, which)(X))


def same_tensors(a, b):
    assert list(a) == list(b)
    for key in a:
        if isinstance(a[key], dict):
            same_tensors(a[key], b[key])
        else:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_pretraining_exports_round_trip(model, tmp_path):
    original = original_pretraining(model, student_dtype=torch.float16)  # the student as fp16 training saves it
    src = tmp_path / "orig.pt"
    torch.save(original, src)
    export(str(src), "safetensors", str(tmp_path / "m.safetensors"))
    export(str(tmp_path / "m.safetensors"), "hf", str(tmp_path / "hf"))
    export(str(tmp_path / "hf"), "fairseq", str(tmp_path / "back.pt"))
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    same_tensors(back["model"], original["model"])
    assert back["model"]["_ema"]["blocks.0.attn.qkv.weight"].dtype == torch.float32
    assert back["model"]["blocks.0.attn.qkv.weight"].dtype == torch.float16
    assert sorted(back) == sorted(original)
    image = back["cfg"]["model"]["modalities"]["image"]
    assert back["cfg"]["model"]["_name"] == "data2vec_multi" and image["decoder"]["decoder_layers"] == 2
    assert load_pretrainer(str(tmp_path / "back.pt")).cfg == load_pretrainer(str(src)).cfg
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "eat" and config["embed_dim"] == 32 and config["model_variant"] == "pretrain"
    for which in ("student", "teacher"):
        want = features(load_encoder(src, which))
        for path in (tmp_path / "m.safetensors", tmp_path / "hf", tmp_path / "hf" / "model.safetensors", tmp_path / "back.pt"):
            assert torch.equal(features(load_encoder(path, which)), want), (path, which)


def test_original_fixture_exports_back_identically(tmp_path):
    """The checkpoint the original EAT code wrote: through safetensors and back, every tensor, name,
    order and dtype is the same."""
    from pathlib import Path

    fixture = Path(__file__).parent / "fixtures" / "parity_stage1" / "eat_original_tiny.pt"
    export(str(fixture), "safetensors", str(tmp_path / "m.safetensors"))
    export(str(tmp_path / "m.safetensors"), "fairseq", str(tmp_path / "back.pt"))
    original = torch.load(fixture, weights_only=True)
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    same_tensors(back["model"], original["model"])
    for key in ("embed_dim", "depth", "num_heads", "clone_batch", "average_top_k_layers"):
        assert back["cfg"]["model"][key] == original["cfg"]["model"][key], key
    decoder = original["cfg"]["model"]["modalities"]["image"]["decoder"]
    assert {k: back["cfg"]["model"]["modalities"]["image"]["decoder"][k] for k in ("decoder_dim", "decoder_layers", "decoder_groups")} \
        == {k: decoder[k] for k in ("decoder_dim", "decoder_layers", "decoder_groups")}


def test_finetuned_exports_round_trip(model, finetuned_file, tmp_path):
    original = original_finetuned(model, tiny_head(model))
    export(str(finetuned_file), "safetensors", str(tmp_path / "ft.safetensors"))
    export(str(tmp_path / "ft.safetensors"), "hf", str(tmp_path / "hf"))
    export(str(tmp_path / "hf"), "fairseq", str(tmp_path / "back.pt"))
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    same_tensors(back["model"], original["model"])
    assert back["cfg"]["model"]["prediction_mode"] == "CLS_TOKEN"
    assert back["cfg"]["model"]["pretrained_model_args"]["model"]["embed_dim"] == 32
    want = load_classifier(finetuned_file)(X)
    for path in (tmp_path / "ft.safetensors", tmp_path / "hf", tmp_path / "back.pt"):
        assert torch.equal(load_classifier(path)(X), want), path


def test_hugging_face_eat_folder(model, tmp_path):
    """A folder in the hub's EAT layout (modeling_eat.py names; fc_norm with nn.LayerNorm's eps 1e-5)."""
    from safetensors.torch import save_file

    s = model.student.state_dict()
    head = tiny_head(model)
    tensors = {"model.local_encoder.proj.weight": s["patch_embed.weight"], "model.local_encoder.proj.bias": s["patch_embed.bias"],
               "model.extra_tokens": s["cls_token"], "model.pre_norm.weight": s["norm.weight"],
               "model.pre_norm.bias": s["norm.bias"],
               "model.fixed_positional_encoder.positions": model.student.pos_table[None].clone(),
               **{"model." + k: v for k, v in s.items() if k.startswith("blocks.")},
               **{"model." + k: v for k, v in head.items()}}
    (tmp_path / "hub").mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "hub" / "model.safetensors")
    config = {"model_type": "eat", "architectures": ["EATModel"], "auto_map": {"AutoModel": "modeling_eat.EATModel"},
              "embed_dim": 32, "depth": 3, "num_heads": 4, "patch_size": 16, "stride": 16, "in_chans": 1, "mel_bins": 128,
              "max_length": 768, "num_classes": 527, "model_variant": "finetune", "mlp_ratio": 4.0, "qkv_bias": True,
              "layer_norm_first": False, "norm_eps": 1e-6, "norm_affine": True, "fixed_positions": True, "img_size": [1024, 128]}
    (tmp_path / "hub" / "config.json").write_text(json.dumps(config))
    (tmp_path / "hub" / "modeling_eat.py").write_text("raise SystemExit('modelling code must never run')\n")
    with torch.no_grad():
        assert torch.equal(features(load_encoder(tmp_path / "hub")), model.student(X))
        logits = load_classifier(tmp_path / "hub")(X)
        assert torch.allclose(logits, reference_logits(model, head, X, eps=1e-5), atol=1e-5, rtol=0)


def test_onnx_matches_torch_with_dynamic_axes(pretraining_file, tmp_path):
    import onnxruntime as ort

    export(str(pretraining_file), "onnx", str(tmp_path / "enc.onnx"), which="teacher")
    session = ort.InferenceSession(str(tmp_path / "enc.onnx"), providers=["CPUExecutionProvider"])
    encoder = load_encoder(pretraining_file, "teacher")
    for batch, frames in ((1, 160), (3, 1024)):
        x = fbank_batch(batch, frames, seed=batch)[:, 0]
        got = session.run(["tokens"], {"fbank": x.numpy()})[0]
        want = features(encoder, x).numpy()
        assert got.shape == want.shape == (batch, 1 + frames // 16 * 8, 32)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_audioset_classes_are_the_ontology_index():
    classes = audioset_classes()
    assert len(classes) == 527
    assert classes[0] == (0, "/m/09x0r", "Speech") and classes[526] == (526, "/m/07hvw1", "Field recording")
    assert len({c.mid for c in classes}) == 527


def test_public_names():
    assert sslam_fast.load_encoder is load_encoder and sslam_fast.load_classifier is load_classifier
    import sslam_fast.hear as hear

    assert {"load_model", "get_scene_embeddings", "get_timestamp_embeddings"} <= set(dir(hear))
