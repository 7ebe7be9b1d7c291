from pathlib import Path

import pytest
import torch

from sslam_fast import CheckpointError, load_pretrainer, save_pretrainer

from helpers import fbank_batch, save_with_classes_of, tiny_model

STAGE1 = Path(__file__).parent / "fixtures" / "parity_stage1" / "eat_original_tiny.pt"


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_own_format_round_trip(tmp_path):
    model = tiny_model(stage=2)
    path = tmp_path / "model.pt"
    save_pretrainer(model, str(path))
    loaded = load_pretrainer(str(path))
    assert loaded.cfg == model.cfg
    for part in ("student", "decoder", "teacher"):
        assert same_state(getattr(model, part), getattr(loaded, part)), part
    x = fbank_batch(2, 1024)
    a = model(x, generator=torch.Generator().manual_seed(0))
    b = loaded(x, draws=a["draws"])
    assert torch.equal(a["loss"], b["loss"])


def test_original_checkpoint_teacher_comes_from_ema():
    model = load_pretrainer(str(STAGE1))
    raw = torch.load(STAGE1, weights_only=True)["model"]
    assert torch.equal(model.student.cls_token, raw["modality_encoders.IMAGE.extra_tokens"])
    assert torch.equal(model.teacher.cls_token, raw["_ema"]["modality_encoders.IMAGE.extra_tokens"])
    assert torch.equal(model.decoder.convs[5].weight, raw["modality_encoders.IMAGE.decoder.blocks.5.0.weight"])
    assert model.cfg.embed_dim == 64 and model.cfg.depth == 12 and model.cfg.clone_batch == 2


def test_stage2_from_a_stage1_checkpoint():
    model = load_pretrainer(str(STAGE1), stage=2, clone_batch=1)
    assert model.cfg.stage == 2
    out = model(fbank_batch(2, 1024), generator=torch.Generator().manual_seed(0))
    assert out["srl_loss"] > 0 and torch.isfinite(out["loss"])


def test_bad_checkpoints_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such"):
        load_pretrainer(str(tmp_path / "missing.pt"))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(STAGE1.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_pretrainer(str(truncated))
    odd = tmp_path / "odd.pt"
    raw = torch.load(STAGE1, weights_only=True)
    raw["model"]["modality_encoders.IMAGE.something_else"] = torch.zeros(1)
    torch.save(raw, odd)
    with pytest.raises(CheckpointError, match="something_else"):
        load_pretrainer(str(odd))
    with pytest.raises(Exception, match="embed_dimm"):
        load_pretrainer(str(STAGE1), embed_dimm=3)


def test_checkpoint_with_classes_that_are_not_installed(tmp_path):
    """Original checkpoints pickle fairseq meters: they load as inert placeholders."""
    class AverageMeter:
        def __init__(self):
            self.val = 3.0

    AverageMeter.__module__ = "fairseq.logging.meters"
    AverageMeter.__qualname__ = "AverageMeter"
    raw = torch.load(STAGE1, weights_only=True)
    raw["extra_state"] = {"metrics": {"train": AverageMeter()}}
    path = tmp_path / "with_meters.pt"
    save_with_classes_of(raw, path, "fairseq.logging.meters", AverageMeter=AverageMeter)
    model = load_pretrainer(str(path))
    assert model.cfg.embed_dim == 64
