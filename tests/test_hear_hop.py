"""HEAR timestamp embeddings at a hop below one patch row: what each embedding is, and the official
validator (hearvalidator 2021.0.2) passing ``sslam_fast.hear_40ms`` without its 50 ms warning."""
import importlib
import importlib.util
import math
import sys
import types
import warnings

import pytest
import torch

import sslam_fast.hear as hear
from sslam_fast import save_pretrainer
from sslam_fast.data.audio import kaldi_fbank, normalise, subtract_mean

from helpers import tiny_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("hear") / "tiny.pt"
    save_pretrainer(tiny_model(), str(path))
    return str(path)


def clips(n=2, seconds=1.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, int(16000 * seconds), generator=g) * 2 - 1


def test_every_hop_embedding_is_the_row_starting_at_its_frame(checkpoint):
    audio = clips()
    model = hear.load_model(checkpoint, hop_ms=40)
    emb, stamps = hear.get_timestamp_embeddings(audio, model)
    raw = kaldi_fbank(subtract_mean(audio))
    n = raw.shape[1]
    assert emb.shape == (2, math.ceil(n / 4), 32) and stamps.shape == emb.shape[:2]
    assert torch.equal(stamps[0], torch.arange(math.ceil(n / 4)).float() * 40 + 80)
    coarse, coarse_stamps = hear.get_timestamp_embeddings(audio, hear.load_model(checkpoint))
    torch.testing.assert_close(emb[:, ::4], coarse, atol=1e-6, rtol=0)
    assert torch.equal(stamps[0, ::4], coarse_stamps[0])
    encoder = model.encoder
    for k in (1, 2, 7, emb.shape[1] - 1):  # frame 4k: row 4k // 16 of the pass over the frames from 4k % 16 on
        shift, row = 4 * k % 16, 4 * k // 16
        frames = torch.nn.functional.pad(raw[:, shift:], (0, 0, 0, 1024 - (n - shift)))
        with torch.no_grad():
            tokens = encoder(normalise(frames))[:, 1 + 8 * row : 1 + 8 * row + 8]
        torch.testing.assert_close(emb[:, k], tokens.mean(dim=1), atol=1e-5, rtol=0)


def test_hop_must_divide_a_patch_row(checkpoint):
    with pytest.raises(ValueError, match="hop_ms must be"):
        hear.load_model(checkpoint, hop_ms=50)


def test_official_validator_passes_without_the_50_ms_warning(checkpoint, monkeypatch, capsys):
    validate = validator(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        validate.ValidateModel("sslam_fast.hear_40ms", checkpoint, device="cpu")()
    assert "Interval between timestamps is 40.0ms" in capsys.readouterr().out
    assert not [w for w in caught if "50ms" in str(w.message)], [str(w.message) for w in caught]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        validate.ValidateModel("sslam_fast.hear", checkpoint, device="cpu")()
    assert [w for w in caught if "50ms" in str(w.message)]  # 160 ms rows: the warning the issue saw


def validator(monkeypatch):
    """hearvalidator.validate; it imports tensorflow at the top but uses it only for TensorFlow
    models, so where tensorflow is not installed a module with an empty ``Module`` class stands in."""
    pytest.importorskip("hearvalidator", reason="pip install hearvalidator==2021.0.2")
    if importlib.util.find_spec("tensorflow") is None:
        stub = types.ModuleType("tensorflow")
        stub.Module = type("Module", (), {})
        monkeypatch.setitem(sys.modules, "tensorflow", stub)
        monkeypatch.delitem(sys.modules, "hearvalidator.validate", raising=False)
    return importlib.import_module("hearvalidator.validate")
