"""One notion of "a checkpoint": every entry point reads every form of it, and every consumer feeds
the model the normalisation it was trained with.

A tiny pretraining run and a tiny fine-tuning run from it, both on fbanks normalised with
non-AudioSet statistics (mean -12.8, std 3.1, 128-frame clips), then: load_pretrainer,
load_encoder, load_classifier, the HEAR API, fine-tuning's init and the CLI's extract / tag / export
on a step directory, its train.pt, the run directory, a save_pretrainer file and the safetensors,
Hugging Face and fairseq exports; extract / tag / HEAR / ONNX against the model fed by hand.
"""
import json
import logging
import os
import socket

import numpy as np
import pytest
import soundfile as sf
import torch

from sslam_fast import cli, finetune, hear, load_classifier, load_encoder, load_pretrainer, save_pretrainer, train
from sslam_fast.data.audio import fbank_features
from sslam_fast.evaluation.finetune import FinetuneModelSection, build_classifier
from sslam_fast.released.export import export
from sslam_fast.released.formats import read_weights
from sslam_fast.released.tools import tag_files
from sslam_fast.trainer.checkpoints import latest_checkpoint

from test_finetune import toy_task

MEAN, STD, FRAMES = -12.8, 3.1, 128
NORM = [f"data.norm_mean={MEAN}", f"data.norm_std={STD}", f"data.target_length={FRAMES}"]
PRETRAIN = [
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.clone_batch=2", "model.decoder_layers=1",
    "model.decoder_groups=8", "model.average_top_k_layers=2", "model.attention=sdpa",
    "data.demo_clips=8", "data.backend=torch", "data.num_workers=0", "train.global_batch=4",
    "train.max_micro_batch=4", "train.max_steps=2", "train.precision=fp32", "optim.warmup_steps=1",
    "checkpoint.every_steps=2", "logging.tensorboard=false", "logging.progress_bar=false", *NORM,
]


def one_process(mp):
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port.getsockname()[1])).items():
        mp.setenv(key, value)
    port.close()


def sets(*values):
    return [arg for value in values for arg in ("--set", value)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(pretraining run dir, fine-tuning run dir, toy task dir), both runs on MEAN / STD."""
    root = tmp_path_factory.mktemp("forms")
    pre, ft, task = str(root / "pre"), str(root / "ft"), toy_task(str(root / "task"), per_class=2, eval_per_class=1)
    with pytest.MonkeyPatch.context() as mp:
        one_process(mp)
        assert train.main(sets(*PRETRAIN, f"checkpoint.dir={pre}")) == 0
        one_process(mp)
        assert finetune.main(sets(
            f"data.dir={task}", "data.task=multiclass", "data.num_workers=0", *NORM,
            f"model.init_from={latest_checkpoint(pre)}", "train.global_batch=4", "train.max_micro_batch=4",
            "train.max_steps=2", "train.precision=fp32", "optim.warmup_steps=1", f"checkpoint.dir={ft}",
            "checkpoint.every_steps=2", "logging.tensorboard=false", "logging.progress_bar=false")) == 0
    return pre, ft, task


@pytest.fixture(scope="module")
def forms(runs, tmp_path_factory):
    """Every form of the pretraining checkpoint, by name: path."""
    pre = runs[0]
    step = latest_checkpoint(pre)
    out = tmp_path_factory.mktemp("exports")
    paths = {"step directory": step, "train.pt": os.path.join(step, "train.pt"), "run directory": pre,
             "pretrainer file": str(out / "own.pt"), "safetensors": str(out / "m.safetensors"),
             "hf folder": str(out / "hf"), "fairseq": str(out / "fairseq.pt")}
    save_pretrainer(load_pretrainer(step), paths["pretrainer file"])
    export(step, "safetensors", paths["safetensors"])
    export(step, "hf", paths["hf folder"])
    export(step, "fairseq", paths["fairseq"])
    return paths


def clip(seconds=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(16000 * seconds)) / 16000
    return 0.2 * torch.sin(2 * torch.pi * 440 * t) + 0.05 * torch.randn(len(t), generator=g)


def own_input(wave, mean=MEAN, std=STD):
    """The fbank as the trainer made it for this model: its statistics, its clip length."""
    return fbank_features(wave, target_length=FRAMES, norm_mean=mean, norm_std=std)[None]


FOUND = {"step directory": "run checkpoint directory", "train.pt": "torch file", "run directory": "its newest",
         "pretrainer file": "torch file", "safetensors": "safetensors file", "hf folder": "Hugging Face",
         "fairseq": "torch file"}


def test_every_entry_point_reads_every_form_with_its_normalisation(forms, tmp_path):
    reference = load_pretrainer(forms["step directory"])
    x = own_input(clip())
    with torch.no_grad():
        want = reference.student(x)
        want_teacher = reference.teacher(x)
    assert not torch.equal(want, want_teacher)
    for name, path in forms.items():
        model = load_pretrainer(path)
        assert (model.input_settings.norm_mean, model.input_settings.norm_std) == (MEAN, STD), name
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values())), name
        for which, expected in (("student", want), ("teacher", want_teacher)):
            encoder = load_encoder(path, which)
            assert FOUND[name] in encoder.found, (name, encoder.found)
            assert encoder.input.target_length == FRAMES and encoder.input.norm_mean == MEAN, name
            with torch.no_grad():
                assert torch.equal(encoder(x), expected), (name, which)
        assert hear.load_model(path).encoder.input.norm_std == STD, name
        export(path, "safetensors", str(tmp_path / "again.safetensors"))
        assert load_encoder(tmp_path / "again.safetensors").input.to_dict() == encoder.input.to_dict(), name
        classifier = build_classifier(FinetuneModelSection(init_from=path), num_classes=3)
        assert all(torch.equal(a, b) for a, b in zip(classifier.encoder.state_dict().values(),
                                                     reference.student.state_dict().values())), name
    assert read_weights(forms["run directory"]).path == os.path.join(forms["step directory"], "train.pt")


def test_train_init_from_a_hugging_face_folder(forms, tmp_path, monkeypatch, caplog):
    """Also: a run whose data.norm_mean / norm_std differ from those its init checkpoint states says so."""
    caplog.set_level(logging.INFO, logger="sslam_fast.train")
    one_process(monkeypatch)
    monkeypatch.setattr(train.Trainer, "run", lambda self: (self.save(), 0)[1])  # save step 0 and stop
    audioset = [s for s in PRETRAIN if not s.startswith(("data.norm_mean", "data.norm_std"))]
    assert train.main(sets(*audioset, f"checkpoint.dir={tmp_path}", f"train.init_from={forms['hf folder']}")) == 0
    assert f"normalised with mean {MEAN:.4g} std {STD:.4g}" in caplog.text and "data.norm_mean=-4.268" in caplog.text
    saved = torch.load(tmp_path / "step_000000000" / "train.pt", weights_only=True)["model"]
    source = load_pretrainer(forms["step directory"]).state_dict()
    assert saved.keys() == source.keys() and all(torch.equal(saved[k], source[k]) for k in saved)


def test_features_use_the_checkpoint_normalisation(runs, forms, tmp_path, capsys):
    """extract, HEAR and ONNX give the model's features of its own input; the override flag changes them."""
    import onnxruntime

    wave = clip(seed=1)
    with torch.no_grad():
        want = load_pretrainer(forms["step directory"]).student(own_input(wave))
    path = tmp_path / "clip.wav"
    sf.write(path, wave.numpy(), 16000, subtype="FLOAT")
    for name in ("step directory", "hf folder", "fairseq"):
        assert cli.main(["extract", "--fp32", "--checkpoint", forms[name], "-o", str(tmp_path / "f.npz"), str(path)]) == 0
        assert f"mean {MEAN:.4g} std {STD:.4g}" in capsys.readouterr().err
        got = np.load(tmp_path / "f.npz")[str(path)]
        np.testing.assert_allclose(got, want[0, 0].numpy(), atol=1e-5, err_msg=name)
    scene = hear.get_scene_embeddings(wave[None], hear.load_model(forms["safetensors"], precision="fp32"))
    torch.testing.assert_close(scene, want[:, 0], atol=1e-5, rtol=1e-5)

    assert cli.main(["export", forms["step directory"], "--format", "onnx", "-o", str(tmp_path / "m.onnx")]) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    meta = session.get_modelmeta().custom_metadata_map
    assert (float(meta["norm_mean"]), float(meta["norm_std"]), int(meta["target_length"])) == (MEAN, STD, FRAMES)
    fbank = own_input(wave, float(meta["norm_mean"]), float(meta["norm_std"])).numpy()
    np.testing.assert_allclose(session.run(None, {"fbank": fbank})[0], want.numpy(), atol=1e-4)

    audioset = own_input(wave, -4.268, 4.569)
    with torch.no_grad():
        want_override = load_pretrainer(forms["step directory"]).student(audioset)
    assert cli.main(["extract", "--fp32", "--checkpoint", forms["step directory"], "--norm-mean", "-4.268", "--norm-std", "4.569",
                     "-o", str(tmp_path / "o.npz"), str(path)]) == 0
    assert "overriding" in capsys.readouterr().err
    got = np.load(tmp_path / "o.npz")[str(path)]
    np.testing.assert_allclose(got, want_override[0, 0].numpy(), atol=1e-5)
    assert not np.allclose(got, want[0, 0].numpy(), atol=1e-3)


def test_tag_and_export_take_a_fine_tuning_run_with_its_class_names(runs, tmp_path, capsys):
    _, ft, task = runs
    step = latest_checkpoint(ft)
    classifier = load_classifier(step)
    assert classifier.labels == ["Tone 250 Hz", "Tone 1000 Hz", "Tone 3000 Hz", "Tone 6000 Hz"]
    assert (classifier.input.norm_mean, classifier.input.norm_std) == (MEAN, STD)
    assert classifier.task == "multiclass"  # the toy task is single-label: softmax probabilities
    wave = clip(seed=2)
    with torch.no_grad():
        want = torch.softmax(classifier(own_input(wave)), dim=-1)[0]
    results, bad = tag_files(step, [os.path.join(task, "audio", "eval_000.wav")], top_k=4)
    assert not bad and {label["name"] for label in results[0]["labels"]} == set(classifier.labels)
    assert all(label["mid"] == "" for label in results[0]["labels"])
    path = tmp_path / "clip.wav"
    sf.write(path, wave.numpy(), 16000, subtype="FLOAT")
    assert cli.main(["tag", "--checkpoint", step, "--json", "--top-k", "4", str(path)]) == 0
    out = capsys.readouterr()
    assert "fine-tuning run" in out.err
    tagged = {label["name"]: label["probability"] for label in json.loads(out.out)[0]["labels"]}
    for i, name in enumerate(classifier.labels):
        assert tagged[name] == pytest.approx(float(want[i]), abs=1e-4), name
    for fmt, out_path in (("safetensors", tmp_path / "ft.safetensors"), ("hf", tmp_path / "hf"),
                          ("fairseq", tmp_path / "ft.pt")):
        export(step, fmt, str(out_path))
        again = load_classifier(out_path)
        assert again.labels == classifier.labels and again.task == "multiclass", fmt
        assert (again.input.norm_mean, again.input.norm_std, again.input.target_length) == (MEAN, STD, FRAMES), fmt
        with torch.no_grad():
            torch.testing.assert_close(again.probabilities(own_input(wave))[0], want, atol=1e-6, rtol=0)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["id2label"]["1"] == "Tone 1000 Hz" and config["sslam_fast"]["input"]["norm_mean"] == MEAN
