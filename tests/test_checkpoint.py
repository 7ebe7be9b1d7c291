"""Atomic files and checkpoint directories: a crash at any point leaves the previous state usable."""
import os

import pytest
import torch

from sslam_fast.serialization import atomic_save
from sslam_fast.trainer import checkpoints as ck


def test_atomic_save_writes_and_replaces(tmp_path):
    path = tmp_path / "a.pt"
    atomic_save({"v": 1}, str(path))
    atomic_save({"v": 2}, str(path))
    assert torch.load(path)["v"] == 2
    assert os.listdir(tmp_path) == ["a.pt"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_atomic_save_interrupted_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.pt"
    atomic_save({"v": 1}, str(path))

    def crash(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"v": 2}, str(path))
    assert torch.load(path)["v"] == 1
    assert os.listdir(tmp_path) == ["a.pt"]  # the temp file is gone too


def _fake_checkpoint(run_dir, step):
    tmp = ck.temp_dir_for(str(run_dir), step)
    os.makedirs(tmp)
    atomic_save({"step": step}, os.path.join(tmp, "train.pt"))
    return tmp


def test_publish_keeps_the_last_n_and_ignores_unfinished(tmp_path):
    for step in (10, 20, 30):
        ck.publish(_fake_checkpoint(tmp_path, step), str(tmp_path), step, keep_last=2)
    unfinished = _fake_checkpoint(tmp_path, 40)
    assert [os.path.basename(p) for p in ck.list_checkpoints(str(tmp_path))] == ["step_000000020", "step_000000030"]
    assert ck.latest_checkpoint(str(tmp_path)).endswith("step_000000030")
    assert ck.remove_stale_temps(str(tmp_path)) == [os.path.basename(unfinished)]
    assert not os.path.exists(unfinished)
    assert ck.latest_checkpoint(str(tmp_path / "missing")) is None


def test_rng_state_round_trip():
    g = torch.Generator().manual_seed(3)
    state = ck.rng_state(g)
    a = (torch.rand(3, generator=g), torch.rand(3))
    ck.restore_rng_state(state, g)
    b = (torch.rand(3, generator=g), torch.rand(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
