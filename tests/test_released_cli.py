"""`sslam-fast extract / tag / export` and the HEAR API on real recordings (the Debian sounds).

What happens to each kind of file (policy in sslam_fast/released/hear.py):
- stereo 44.1 kHz (phone-incoming-call.oga, 1.46 s): channels averaged, resampled; one window;
- shorter than one 16-frame patch (bell.oga, 0.14 s = 12 frames): padded, one patch row at 80 ms;
- silent (zeros, written here): finite features like any other clip;
- longer than 10.24 s (dir-intro.wav, 12.15 s): two 1024-frame windows, the last padded; rows
  only where the clip is; the utterance feature is the mean of the two windows' CLS tokens;
- missing, corrupt, or shorter than one 25 ms frame: listed on stderr and skipped, exit 1.
"""
import json
import math
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from sslam_fast import cli, load_classifier, load_encoder
from sslam_fast import hear
from sslam_fast.data import audio
from sslam_fast.released.classes import audioset_classes
from sslam_fast.released.hear import fbank_windows

from released_builders import write_original_checkpoints

STEREO = "/usr/share/sounds/freedesktop/stereo/phone-incoming-call.oga"
SHORT = "/usr/share/sounds/freedesktop/stereo/bell.oga"
LONG = "/usr/share/asterisk/sounds/en_US_f_Allison/dir-intro.wav"
pytestmark = pytest.mark.skipif(not all(map(os.path.exists, (STEREO, SHORT, LONG))),
                                reason="needs the Debian recordings (apt-get install sound-theme-freedesktop asterisk-core-sounds-en-wav)")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("audio")
    sf.write(d / "silent.wav", np.zeros(16000, dtype=np.float32), 16000)
    sf.write(d / "tiny.wav", np.full(100, 0.1, dtype=np.float32), 16000)  # 100 samples: no 25 ms frame
    (d / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt not really")
    return {"good": [STEREO, SHORT, str(d / "silent.wav"), LONG],
            "bad": [str(d / "missing.wav"), str(d / "corrupt.wav"), str(d / "tiny.wav")]}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return write_original_checkpoints(tmp_path_factory.mktemp("ckpt"))


def frames_of(path):
    return audio.num_frames(audio.load_audio(path).shape[0])


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, files, checkpoints):
    out, results = tmp_path_factory.mktemp("features"), {}
    for granularity in ("utterance", "frame", "all"):
        target = out / granularity
        rc = cli.main(["extract", "--checkpoint", checkpoints["pretrain"], *files["good"], *files["bad"],
                       "--granularity", granularity, "-o", str(target), "--batch-size", "3", "--fp32"])
        results[granularity] = (rc, target)
    rc = cli.main(["extract", "--checkpoint", checkpoints["pretrain"], *files["good"], "-o", str(out / "all.npz"), "--fp32"])
    results["npz"] = (rc, out / "all.npz")
    return results


def stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def test_extract_shapes_and_bad_files(extracted, files, capsys):
    for granularity in ("utterance", "frame", "all"):
        rc, target = extracted[granularity]
        assert rc == 1, "bad files make the exit status non-zero"
        suffixes = (".npy", ".ms.npy") if granularity == "frame" else (".npy",)
        assert sorted(os.listdir(target)) == sorted(stem(f) + s for f in files["good"] for s in suffixes)
        for path in files["good"]:
            array = np.load(target / (stem(path) + ".npy"))
            n = frames_of(path)
            want = {"utterance": (32,), "frame": (math.ceil(n / 16), 8, 32),
                    "all": (math.ceil(n / 1024), 1 + 512, 32)}[granularity]
            assert array.shape == want and np.isfinite(array).all(), (path, granularity)
    assert extracted["npz"][0] == 0
    assert frames_of(SHORT) < 16 and frames_of(LONG) > 1024


def test_bad_files_are_named_on_stderr(files, checkpoints, tmp_path, capsys):
    rc = cli.main(["extract", "--checkpoint", checkpoints["pretrain"], STEREO, *files["bad"], "-o", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1
    for path in files["bad"]:
        assert f"skipped {path}" in err
    assert "shorter than one 25 ms frame" in err
    assert os.listdir(tmp_path) == [stem(STEREO) + ".npy"]


def test_extract_agrees_with_hear(extracted, files, checkpoints):
    model = hear.load_model(checkpoints["pretrain"], precision="fp32")
    archive = np.load(extracted["npz"][1])
    assert sorted(archive.files) == sorted(files["good"])
    for path in files["good"]:
        wave = audio.load_audio(path)[None]
        emb, stamps = hear.get_timestamp_embeddings(wave, model)
        scene = hear.get_scene_embeddings(wave, model)
        frame = np.load(extracted["frame"][1] / (stem(path) + ".npy"))
        np.testing.assert_array_equal(np.load(extracted["frame"][1] / (stem(path) + ".ms.npy")), stamps[0].numpy())
        utterance = np.load(extracted["utterance"][1] / (stem(path) + ".npy"))
        np.testing.assert_allclose(emb[0].numpy(), frame.mean(axis=1), atol=1e-5, rtol=0)
        np.testing.assert_allclose(scene[0].numpy(), utterance, atol=1e-5, rtol=0)
        np.testing.assert_allclose(archive[path], utterance, atol=1e-6, rtol=0)
        rows = math.ceil(frames_of(path) / 16)
        assert emb.shape == (1, rows, 32) and stamps.shape == (1, rows)
        assert torch.equal(stamps[0], torch.arange(rows, dtype=torch.float32) * 160 + 80)


def test_window_policy(checkpoints):
    encoder = load_encoder(checkpoints["pretrain"])
    short = audio.load_audio(STEREO)
    windows, n = fbank_windows(short)
    assert windows.shape == (1, 1024, 128) and torch.equal(windows[0], audio.fbank_features(short))
    wave = audio.load_audio(LONG)
    windows, n = fbank_windows(wave)
    raw = audio.normalise(audio.kaldi_fbank(audio.subtract_mean(wave)))
    assert windows.shape == (2, 1024, 128) and n == raw.shape[0]
    assert torch.equal(windows[0], raw[:1024]) and torch.equal(windows[1, : n - 1024], raw[1024:])
    assert torch.equal(windows[1, n - 1024:], audio.normalise(torch.zeros(2048 - n, 128)))
    model = hear.HearModel(encoder)
    with torch.no_grad():
        cls = encoder(windows)[:, 0]
    np.testing.assert_allclose(hear.get_scene_embeddings(wave[None], model)[0], cls.mean(0), atol=1e-6, rtol=0)
    _, stamps = hear.get_timestamp_embeddings(wave[None], model)
    assert stamps.shape[1] == 76 and stamps[0, -1] == 75 * 160 + 80 < wave.shape[0] / 16


def test_hear_api_batch_equals_single_clips(checkpoints):
    model = hear.load_model(checkpoints["pretrain"], precision="fp32")
    assert model.sample_rate == 16000 and model.scene_embedding_size == model.timestamp_embedding_size == 32
    a = audio.load_audio(LONG)[:20000]
    b = audio.load_audio(STEREO)[:20000]
    batch = torch.stack([a, b])
    emb, stamps = hear.get_timestamp_embeddings(batch, model)
    assert emb.shape == (2, math.ceil(audio.num_frames(20000) / 16), 32) and stamps.shape == emb.shape[:2]
    for i, clip in enumerate((a, b)):
        single, _ = hear.get_timestamp_embeddings(clip[None], model)
        torch.testing.assert_close(emb[i], single[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(hear.get_scene_embeddings(batch, model)[i], hear.get_scene_embeddings(clip[None], model)[0],
                                   atol=1e-5, rtol=0)
    silent = hear.get_scene_embeddings(torch.zeros(1, 16000), model)
    assert torch.isfinite(silent).all()
    with pytest.raises(ValueError, match="n_sounds, n_samples"):
        hear.get_scene_embeddings(torch.zeros(16000), model)


def test_tag_real_recording(checkpoints, capsys, tmp_path):
    assert cli.main(["tag", "--checkpoint", checkpoints["finetuned"], STEREO, LONG, "--json", "--top-k", "5", "--fp32"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in results] == [STEREO, LONG]
    classes = audioset_classes()
    classifier = load_classifier(checkpoints["finetuned"])
    with torch.no_grad():
        probs = torch.sigmoid(classifier(audio.load_features(STEREO)[None]))[0]
        long_probs = torch.sigmoid(classifier(fbank_windows(audio.load_audio(LONG))[0])).max(0).values
    for result, p in zip(results, (probs, long_probs)):
        labels = result["labels"]
        assert len(labels) == 5 and [l["index"] for l in labels] == torch.topk(p, 5).indices.tolist()
        for label in labels:
            assert (label["mid"], label["name"]) == (classes[label["index"]].mid, classes[label["index"]].name)
            assert abs(label["probability"] - float(p[label["index"]])) < 1e-4
    assert cli.main(["tag", "--checkpoint", checkpoints["finetuned"], STEREO, str(tmp_path / "missing.wav")]) == 1
    out = capsys.readouterr()
    assert out.out.startswith(STEREO + "\n") and len(out.out.splitlines()) == 6 and "missing.wav" in out.err


def test_extract_reads_manifests(checkpoints, tmp_path):
    manifest = tmp_path / "train.tsv"
    manifest.write_text(f"{os.path.dirname(STEREO)}\n{os.path.basename(STEREO)}\t0\n{os.path.basename(SHORT)}\t0\n")
    assert cli.main(["extract", "--checkpoint", checkpoints["pretrain"], str(manifest), "-o", str(tmp_path / "out")]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == sorted([stem(STEREO) + ".npy", stem(SHORT) + ".npy"])


def test_export_command(checkpoints, tmp_path):
    out = tmp_path / "model.safetensors"
    assert cli.main(["export", checkpoints["pretrain"], "--format", "safetensors", "-o", str(out)]) == 0
    x = audio.load_features(STEREO)[None]
    with torch.no_grad():
        assert torch.equal(load_encoder(out)(x), load_encoder(checkpoints["pretrain"])(x))
