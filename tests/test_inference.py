"""The CPU inference paths (released/inference.py) and streamed long files (released/stream.py).

- path selection: bf16 only where the CPU has native bf16 (AVX512-BF16 / AMX), the forced-fp32
  flag, int8 on request, CUDA left in fp32;
- accuracy of each path on real recordings (the Debian sounds) against fp32: cosine similarity
  >= 0.999 per clip for the utterance and frame features, the tag's top 5 unchanged (bf16);
- an automatic bf16 choice that misses the bound falls back to fp32;
- a streamed file gives the whole-file windows, features and tags within rounding.
"""
import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from sslam_fast import cli, hear
from sslam_fast.data import audio
from sslam_fast.released import inference
from sslam_fast.released.hear import fbank_windows
from sslam_fast.released.inference import CpuInfo, choose_path, cosine_per_window, read_cpu_info
from sslam_fast.released.formats import InputSettings
from sslam_fast.released.stream import HOP, stream_windows
from sslam_fast.released.tools import extract_files, tag_files

from helpers import tiny_model
from released_builders import write_original_checkpoints

STEREO = "/usr/share/sounds/freedesktop/stereo/phone-incoming-call.oga"  # 44.1 kHz stereo, 1.46 s
SHORT = "/usr/share/sounds/freedesktop/stereo/bell.oga"  # 0.14 s
LONG = "/usr/share/asterisk/sounds/en_US_f_Allison/dir-intro.wav"  # 8 kHz, 12.15 s: two windows
RECORDINGS = [STEREO, SHORT, LONG]
needs_recordings = pytest.mark.skipif(not all(map(os.path.exists, RECORDINGS)), reason="needs the Debian recordings")

AVX512_BF16 = CpuInfo("test CPU", frozenset({"avx2", "avx512f", "avx512_bf16"}))
AMX = CpuInfo("test CPU", frozenset({"avx512f", "amx_tile", "amx_bf16"}))
PLAIN = CpuInfo("test CPU", frozenset({"avx2", "fma"}))


def test_read_cpu_info(tmp_path):
    text = "processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t: other\n"
    (tmp_path / "cpuinfo").write_text(text)
    info = read_cpu_info(str(tmp_path / "cpuinfo"))
    assert info.model == "Test CPU 9000" and info.flags == {"fpu", "avx2", "avx512_bf16"}
    assert info.bf16_flag == "avx512_bf16" and AMX.bf16_flag == "amx_bf16" and PLAIN.bf16_flag is None
    assert read_cpu_info(str(tmp_path / "absent")).flags == frozenset()


def test_path_selection(monkeypatch):
    auto = choose_path("cpu", "auto", AVX512_BF16)
    assert (auto.precision, auto.verify) == ("bf16", True) and "avx512_bf16" in auto.reason
    assert choose_path("cpu", "auto", AMX).precision == "bf16"
    plain = choose_path("cpu", "auto", PLAIN)
    assert (plain.precision, plain.verify) == ("fp32", False) and "no native bf16" in plain.reason
    for info in (AVX512_BF16, AMX, PLAIN):
        assert choose_path("cpu", "fp32", info).precision == "fp32"
        assert choose_path("cpu", "int8", info).precision == "int8"
        assert not choose_path("cpu", "bf16", info).verify
    assert "emulates" in choose_path("cpu", "bf16", PLAIN).reason
    assert choose_path("cuda", "auto", AVX512_BF16).precision == "fp32"
    with pytest.raises(ValueError, match="CPU only"):
        choose_path("cuda", "int8")
    with pytest.raises(ValueError, match="precision must be one of"):
        choose_path("cpu", "fp16")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert choose_path("cpu", "auto", AVX512_BF16).precision == "fp32"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return write_original_checkpoints(tmp_path_factory.mktemp("ckpt"))


def test_cli_says_which_path(checkpoints, tmp_path, capsys):
    stamp = tmp_path / "clip.wav"
    sf.write(stamp, np.sin(np.arange(16000) * 0.05).astype(np.float32), 16000)
    assert cli.main(["extract", "--checkpoint", checkpoints["pretrain"], str(stamp), "-o", str(tmp_path / "a")]) == 0
    expected = "bf16" if inference.native_bf16() else "fp32"
    assert f"inference: {expected} on cpu" in capsys.readouterr().err
    assert cli.main(["extract", "--checkpoint", checkpoints["pretrain"], str(stamp), "-o", str(tmp_path / "b"), "--fp32"]) == 0
    assert "inference: fp32 on cpu" in capsys.readouterr().err
    assert cli.main(["tag", "--checkpoint", checkpoints["finetuned"], str(stamp), "--precision", "int8"]) == 0
    assert "inference: int8 on cpu" in capsys.readouterr().err


def _features(checkpoint, precision, granularity, tmp_path):
    out = tmp_path / f"{precision}-{granularity}.npz"
    written, bad = extract_files(checkpoint, RECORDINGS, str(out), granularity, progress=False, precision=precision)
    assert written == RECORDINGS and not bad
    return np.load(out)


@needs_recordings
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_accuracy_bound_on_recordings(checkpoints, tmp_path, precision):
    for granularity in ("utterance", "frame"):
        ref = _features(checkpoints["pretrain"], "fp32", granularity, tmp_path)
        got = _features(checkpoints["pretrain"], precision, granularity, tmp_path)
        for path in RECORDINGS:
            a, b = torch.from_numpy(got[path]), torch.from_numpy(ref[path])
            assert a.shape == b.shape and not torch.equal(a, b), "the path must compute differently from fp32"
            assert float(cosine_per_window(a.reshape(1, -1), b.reshape(1, -1))) >= inference.COSINE_BOUND, (path, granularity)
            if granularity == "frame":  # every 160 ms row on its own too
                assert float(cosine_per_window(a.flatten(1), b.flatten(1)).min()) >= 0.99, path


@needs_recordings
def test_bf16_tags_keep_the_top_5(checkpoints):
    """The top 5 of bf16 are fp32's, in fp32's order up to near-ties: the random demo head gives
    its top classes fp32 probabilities 4e-4 apart, closer than a trained head would; classes
    closer than TIE in fp32 may swap."""
    tie = 5e-4
    ref, _ = tag_files(checkpoints["finetuned"], RECORDINGS, top_k=527, precision="fp32")
    got, _ = tag_files(checkpoints["finetuned"], RECORDINGS, top_k=5, precision="bf16")
    for r, g in zip(ref, got):
        fp32 = {label["index"]: label["probability"] for label in r["labels"]}
        ranked = [label["probability"] for label in r["labels"][:5]]
        assert all(abs(fp32[label["index"]] - p) <= tie for label, p in zip(g["labels"], ranked)), r["file"]
        assert all(abs(label["probability"] - fp32[label["index"]]) <= 1e-3 for label in g["labels"])


@needs_recordings
def test_auto_bf16_falls_back_to_fp32_below_the_bound(checkpoints, monkeypatch):
    wave = audio.load_audio(LONG)[None]
    ref = hear.get_scene_embeddings(wave, hear.load_model(checkpoints["pretrain"], precision="fp32"))
    monkeypatch.setattr(inference, "native_bf16", lambda info=None: True)
    monkeypatch.setattr(inference, "cpu_info", lambda: AVX512_BF16)
    kept = hear.load_model(checkpoints["pretrain"])
    scene = hear.get_scene_embeddings(wave, kept)
    assert kept.encoder.path.precision == "bf16" and not torch.equal(scene, ref)
    monkeypatch.setattr(inference, "COSINE_BOUND", 1.01)  # no bf16 output can reach it
    model = hear.load_model(checkpoints["pretrain"])
    assert model.encoder.path.precision == "bf16"
    assert torch.equal(hear.get_scene_embeddings(wave, model), ref)
    assert model.encoder.path.precision == "fp32" and "fell back to fp32" in model.encoder.path.reason
    assert torch.equal(hear.get_scene_embeddings(wave, model), ref)


@needs_recordings
def test_stream_equals_whole_file(tmp_path):
    rng = np.random.default_rng(0)
    noise = tmp_path / "noise44k.flac"  # 25 s at 44.1 kHz, stereo: three windows, resampled block by block
    sf.write(noise, (0.1 * rng.standard_normal((44100 * 25 + 123, 2))).astype(np.float32), 44100)
    edge = tmp_path / "edge.wav"  # two full windows and 239 samples: no third window
    sf.write(edge, (0.1 * rng.standard_normal(2 * 1024 * HOP + 239)).astype(np.float32), 16000)
    own = InputSettings(norm_mean=-6.5, norm_std=3.2, target_length=512)  # a checkpoint's own statistics and clip length
    for path, input in [*((p, InputSettings()) for p in [*RECORDINGS, str(noise), str(edge)]), (str(noise), own)]:
        whole, frames = fbank_windows(audio.load_audio(path), input)
        for block_seconds in (0.7, 20.0):
            pieces = list(stream_windows(path, block_seconds, input))
            assert max(p.shape[0] for p, _ in pieces) <= max(1, round(block_seconds * 16000 / (input.target_length * HOP)))
            streamed = torch.cat([p for p, _ in pieces])
            assert streamed.shape == whole.shape and sum(n for _, n in pieces) == frames, path
            # only rounding differs: the whole-file path subtracts the clip's mean first (see stream.py)
            torch.testing.assert_close(streamed, whole, atol=1e-3, rtol=0)


@needs_recordings
def test_streamed_extract_and_tag_equal_whole_file(checkpoints, tmp_path, capsys):
    files = [LONG, STEREO]
    for granularity in ("utterance", "frame", "all"):
        arrays = []
        for stream_seconds in (0.0, float("inf")):
            out = tmp_path / f"{granularity}-{stream_seconds}.npz"
            extract_files(checkpoints["pretrain"], files, str(out), granularity, progress=False, precision="fp32",
                          stream_seconds=stream_seconds)
            arrays.append(np.load(out))
        for path in files:
            np.testing.assert_allclose(arrays[0][path], arrays[1][path], atol=1e-3, rtol=0)
    assert cli.main(["tag", "--checkpoint", checkpoints["finetuned"], LONG, "--windows", "--json", "--fp32"]) == 0
    whole = json.loads(capsys.readouterr().out)[0]
    streamed, _ = tag_files(checkpoints["finetuned"], [LONG], precision="fp32", windows=True, stream_seconds=0.0,
                            report=print)
    assert "real-time factor" in capsys.readouterr().out
    assert [w["start_s"] for w in whole["windows"]] == [0.0, 10.24] and whole["windows"][1]["end_s"] == 12.13
    for a, b in zip([whole, *whole["windows"]], [streamed[0], *streamed[0]["windows"]]):
        assert [label["index"] for label in a["labels"]] == [label["index"] for label in b["labels"]]
        np.testing.assert_allclose([label["probability"] for label in a["labels"]],
                                   [label["probability"] for label in b["labels"]], atol=2e-4)


@needs_recordings
def test_linear_probe_features_take_the_path(tmp_path):
    from sslam_fast.evaluation import compute_features
    from sslam_fast.released.encoder import AudioEncoder

    class Utterance(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = AudioEncoder(tiny_model().student)

        def forward(self, fbank):
            return self.encoder.extract_features(fbank, "utterance")

    module = Utterance().train()
    clips = torch.cat([fbank_windows(audio.load_audio(path))[0] for path in RECORDINGS])
    fp32 = compute_features(module, clips, cache_path=str(tmp_path), precision="fp32", batch_size=2)
    assert module.training and len(os.listdir(tmp_path)) == 1
    with torch.no_grad():
        assert torch.equal(fp32, module.eval()(clips))
    module.train()
    int8 = compute_features(module, clips, cache_path=str(tmp_path), precision="int8", batch_size=2)
    assert len(os.listdir(tmp_path)) == 2, "another path, another cache entry"
    assert not torch.equal(int8, fp32) and float(cosine_per_window(int8, fp32).min()) >= inference.COSINE_BOUND
    assert all(p.dtype == torch.float32 for p in module.parameters()), "the module passed in is left as it is"
    auto = compute_features(module, clips, precision="auto", batch_size=2)
    assert torch.equal(auto, fp32) != inference.native_bf16()
    with pytest.raises(ValueError, match="holds none"):
        compute_features(torch.nn.Flatten(), clips, precision="bf16")


def test_demo_pretrains_in_the_precision_asked(monkeypatch, tmp_path):
    """`sslam-fast demo --precision bf16` hands train.precision=bf16 to the trainer (CPU bf16 autocast)."""
    from sslam_fast import train
    from sslam_fast.evaluation import demo

    seen = []
    monkeypatch.setattr(train, "main", lambda argv: seen.append(argv) or 1)
    for precision in ("fp32", "bf16"):
        with pytest.raises(RuntimeError, match="stopped with status 1"):
            demo._pretrain(str(tmp_path), "m.tsv", demo.QUICK, demo.RECIPE, (0.0, 1.0), 1, 1e-3, 0, precision=precision)
        assert f"train.precision={precision}" in seen[-1]
    with pytest.raises(ValueError, match="precision"):
        demo.run_demo(str(tmp_path), quick=True, precision="fp16")
