"""Hostile checkpoint directories and files: nothing runs, nothing crashes, nothing hangs.

Each class of attack goes through the resume path (``read_resume_state``, then a real resume that
must fall back to the previous checkpoint) and, for the file payloads, through the public loaders.
An attacker who can write into a checkpoint directory can also rewrite its ``checksums.json``
(``hostile.forge_checksums``). A hang is turned into a failure by an alarm.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from sslam_fast import CheckpointError, load_classifier, load_encoder, load_pretrainer
from sslam_fast.serialization import MAX_DEPTH, load_bytes, safe_load
from sslam_fast.trainer import checkpoints as ck
from sslam_fast.trainer import loop

sys.path.insert(0, os.path.dirname(__file__))
import hostile  # noqa: E402
from helpers import Payload  # noqa: E402
from test_finetune import pretrained, toy  # noqa: E402,F401 (fixtures)
from test_train import run_in_process  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ENGINE_MODEL = "deepspeed/engine/mp_rank_00_model_states.pt"
pytestmark = pytest.mark.slow


@contextmanager
def within(seconds: int):
    """Fail instead of hanging."""
    def expired(*_):
        raise AssertionError(f"hung for {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("two_checkpoints")
    with pytest.MonkeyPatch.context() as mp:
        assert run_in_process(mp, str(run_dir), "train.max_steps=2", "checkpoint.every_steps=1") == 0
    return run_dir


@pytest.fixture
def run(two_checkpoints, tmp_path):
    """A copy of the run; ``run / "step_000000002"`` is the checkpoint to attack."""
    target = tmp_path / "run"
    target.mkdir()
    for name in ("step_000000001", "step_000000002"):
        shutil.copytree(two_checkpoints / name, target / name, symlinks=True)
    return target


def payload_file(path: Path, marker: Path) -> None:
    """``path`` rewritten with an ``os.system`` payload beside its real content."""
    state = torch.load(path, weights_only=False)
    state["evil"] = Payload(os.system, f"touch {marker}")
    torch.save(state, path)


def resume_falls_back(run: Path, monkeypatch, caplog, why: str) -> None:
    """A resume of ``run`` skips step 2 (reported, renamed aside) and continues from step 1."""
    with within(120):
        assert run_in_process(monkeypatch, str(run), "train.max_steps=3", "checkpoint.every_steps=1") == 0
    assert any("skipped checkpoint" in r.getMessage() and why in r.getMessage() for r in caplog.records), why
    assert (run / "step_000000002.rejected").is_dir()


def rejected(step: Path, why: str, layout: bool = True) -> None:
    """Refused by the resume's reads, and (``layout``: a fault of the directory) by verification."""
    with within(30):
        if layout:
            assert why in (ck.verify_checkpoint(str(step)) or "")
        with pytest.raises(CheckpointError, match=why):
            ck.read_resume_state(str(step), 0)


# --------------------------------------------------------------------------- the directory
def test_symlinked_engine_directory(run, tmp_path, monkeypatch, caplog):
    step, marker, outside = run / "step_000000002", tmp_path / "marker", tmp_path / "outside"
    shutil.move(step / "deepspeed" / "engine", outside)
    payload_file(outside / "mp_rank_00_model_states.pt", marker)
    os.symlink(outside, step / "deepspeed" / "engine")
    hostile.forge_checksums(str(step))  # os.walk does not enter the link: its files are not listed
    rejected(step, "engine: a symbolic link")
    resume_falls_back(run, monkeypatch, caplog, "symbolic link")
    assert not marker.exists()


def test_symlinked_file(run, tmp_path, monkeypatch, caplog):
    step, marker, outside = run / "step_000000002", tmp_path / "marker", tmp_path / "train.pt"
    shutil.move(step / "train.pt", outside)
    payload_file(outside, marker)
    os.symlink(outside, step / "train.pt")
    hostile.forge_checksums(str(step))  # the link is followed and its target hashed
    rejected(step, "train.pt: a symbolic link")
    resume_falls_back(run, monkeypatch, caplog, "symbolic link")
    assert not marker.exists()


def test_fifo_in_the_engine_directory(run, monkeypatch, caplog):
    step = run / "step_000000002"
    os.mkfifo(step / "deepspeed" / "engine" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    rejected(step, "optim_states.pt: a FIFO")
    resume_falls_back(run, monkeypatch, caplog, "FIFO")


def test_fifo_listed_in_the_checksums(run):
    step = run / "step_000000002"
    os.mkfifo(step / "deepspeed" / "engine" / "extra.pt")
    hostile.forge_checksums(str(step), {"deepspeed/engine/extra.pt": {"size": 0, "sha256": "0" * 64}})
    rejected(step, "extra.pt: a FIFO")


@pytest.mark.parametrize("loader", ["safe_load", "load_pretrainer", "load_encoder", "load_classifier"])
def test_fifo_given_to_a_loader(tmp_path, loader):
    os.mkfifo(tmp_path / "model.pt")
    with within(30), pytest.raises(CheckpointError, match="model.pt: not a regular file"):
        LOADERS[loader](str(tmp_path / "model.pt"))


def test_file_not_listed(run, monkeypatch, caplog):
    step = run / "step_000000002"
    (step / "deepspeed" / "engine" / "latest").write_text("engine")
    rejected(step, "latest: not listed in checksums.json")
    resume_falls_back(run, monkeypatch, caplog, "not listed")


@pytest.mark.parametrize("files", [
    ["train.pt"],  # a list where a mapping is expected
    {"train.pt": 12},  # an integer entry
    {"train.pt": {"size": "1", "sha256": "0" * 64}},
    {"train.pt": {"size": 1, "sha256": None}},
], ids=["list", "integer-entry", "size-text", "digest-none"])
def test_malformed_checksums(run, monkeypatch, caplog, files):
    step = run / "step_000000002"
    (step / "checksums.json").write_text(json.dumps({"hash": "sha256", "files": files}))
    rejected(step, "checksums.json: ")
    resume_falls_back(run, monkeypatch, caplog, "checksums.json")


@pytest.mark.parametrize("escape", ["../step_000000001/train.pt", "/ABSOLUTE", "deepspeed/../train.pt", "./train.pt"])
def test_path_escaping_checksums_open_nothing(run, tmp_path, escape):
    """The escaping entry names a FIFO: opening it would hang."""
    step = run / "step_000000002"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    escape = str(fifo) if escape == "/ABSOLUTE" else escape
    hostile.forge_checksums(str(step), {escape: {"size": 0, "sha256": "0" * 64}})
    rejected(step, "not a relative path inside the checkpoint")


def test_file_swapped_between_check_and_load(run, tmp_path, monkeypatch, caplog):
    """The engine file is replaced (and the checksums forged) after the resume's checks, before
    DeepSpeed loads it: what DeepSpeed gets is read again and checked against the listing read first."""
    step, marker = run / "step_000000002", tmp_path / "marker"
    hostile_copy = tmp_path / "engine.pt"
    shutil.copy(step / ENGINE_MODEL, hostile_copy)
    payload_file(hostile_copy, marker)
    checked = loop.read_resume_state

    def check_then_swap(path, *args, **kwargs):
        files = checked(path, *args, **kwargs)
        os.replace(hostile_copy, os.path.join(path, ENGINE_MODEL))
        hostile.forge_checksums(path)
        return files

    monkeypatch.setattr(loop, "read_resume_state", check_then_swap)
    with within(120):
        assert run_in_process(monkeypatch, str(run), "train.max_steps=3", "checkpoint.every_steps=1") == 1
    assert any(re.search(r"mp_rank_00_model_states.pt: (SHA-256 differs|\d+ bytes, \d+ when it was saved)", r.getMessage())
               for r in caplog.records)
    assert not marker.exists()


def test_engine_reader_serves_only_what_was_checked(run, tmp_path):
    step, marker = run / "step_000000002", tmp_path / "marker"
    files = ck.read_resume_state(str(step), 0)
    payload_file(step / ENGINE_MODEL, marker)
    hostile.forge_checksums(str(step))
    reader = ck._CheckedEngineFiles(object(), str(step), files["listing"])
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states.pt: \d+ bytes, \d+ when it was saved"):
        reader.load(str(step / ENGINE_MODEL))
    with pytest.raises(CheckpointError, match="does not list"):
        reader.load(str(step / "deepspeed" / "engine" / "other.pt"))
    assert not marker.exists()


def test_malformed_content_with_forged_checksums(run, monkeypatch, caplog):
    """A train.pt that loads but whose content has the wrong shape: rejected (fall back) when the
    resume's checks meet it, a CheckpointError naming it when the resume itself does."""
    step = run / "step_000000002"
    state = torch.load(step / "train.pt", weights_only=True)
    torch.save(dict(state, config=[]), step / "train.pt")
    hostile.forge_checksums(str(step))
    rejected(step, "train.pt: malformed checkpoint", layout=False)
    resume_falls_back(run, monkeypatch, caplog, "malformed checkpoint")

    step = run / "step_000000003"
    del state["counters"]
    torch.save(state, step / "train.pt")
    hostile.forge_checksums(str(step))
    with within(120):
        assert run_in_process(monkeypatch, str(run), "train.max_steps=4", "checkpoint.every_steps=1") == 1
    assert any(f"{step}: malformed checkpoint (KeyError: 'counters')" in r.getMessage() for r in caplog.records)


def test_fine_tuning_resume_refuses_a_symlinked_engine_directory(toy, pretrained, tmp_path, monkeypatch, caplog):
    """Fine-tuning's resume reads its checkpoint through the same checks (it has no fallback)."""
    from test_finetune import run_in_process as fine_tune

    run_dir, marker, outside = tmp_path / "run", tmp_path / "marker", tmp_path / "outside"
    assert fine_tune(monkeypatch, toy, str(run_dir), "train.max_steps=2", f"model.init_from={pretrained}") == 0
    step = run_dir / "step_000000002"
    shutil.move(step / "deepspeed" / "engine", outside)
    payload_file(outside / "mp_rank_00_model_states.pt", marker)
    os.symlink(outside, step / "deepspeed" / "engine")
    hostile.forge_checksums(str(step))
    with within(120):
        assert fine_tune(monkeypatch, toy, str(run_dir), "train.max_steps=4", f"model.init_from={pretrained}") == 1
    assert any("engine: a symbolic link" in r.getMessage() for r in caplog.records)
    assert not marker.exists()


# --------------------------------------------------------------------------- the files
LOADERS = {"safe_load": safe_load, "load_pretrainer": load_pretrainer, "load_encoder": load_encoder,
           "load_classifier": load_classifier}


def in_child(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_numpy_dtype_flags_payload_is_refused_without_a_crash(run, tmp_path):
    """Each loader, then the resume's reads, in a child process: a signal exit fails the test."""
    path = tmp_path / "pointers.pt"
    path.write_bytes(hostile.dtype_flags_payload())
    step = run / "step_000000002"
    (step / "train.pt").write_bytes(hostile.dtype_flags_payload())
    hostile.forge_checksums(str(step))
    code = f"""
import sslam_fast
from sslam_fast.trainer.checkpoints import read_resume_state
calls = [(name, lambda f=getattr(sslam_fast, name) if name != "safe_load" else sslam_fast.serialization.safe_load:
          f({str(path)!r})) for name in {list(LOADERS)!r}]
calls.append(("resume", lambda: read_resume_state({str(step)!r}, 0)))
for name, call in calls:
    try:
        call()
        print(name, "loaded")
    except sslam_fast.CheckpointError as e:
        print(name, "CheckpointError", e)
"""
    done = in_child(code)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    lines = done.stdout.splitlines()
    assert len(lines) == 5 and all("CheckpointError" in line and "not a plain numeric dtype" in line for line in lines), lines


def test_plain_values_still_load(tmp_path):
    """What real checkpoints hold: numeric arrays of either byte order, numpy scalars, sets (their
    protocol-2 name is Python 2's ``__builtin__.set``), a Namespace."""
    import argparse

    import numpy as np

    values = {"a": np.arange(6, dtype=">f4").reshape(2, 3), "b": np.float64(1.5), "c": np.array([True, False])}
    torch.save({"model": {}, "extra": values, "set": {1, 2}, "args": argparse.Namespace(lr=0.1)}, tmp_path / "plain.pt")
    loaded = safe_load(str(tmp_path / "plain.pt"))
    assert all(np.array_equal(loaded["extra"][k], v) and loaded["extra"][k].dtype.name == np.asarray(v).dtype.name
               for k, v in values.items())
    assert loaded["set"] == {1, 2} and loaded["args"].lr == 0.1


def test_huge_memo_index_allocates_nothing(run, tmp_path, monkeypatch, caplog):
    path = tmp_path / "memo.pt"
    path.write_bytes(hostile.huge_memo_payload())
    assert path.stat().st_size < 1000
    code = f"""
import resource, sslam_fast
from sslam_fast.serialization import safe_load
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for f in (safe_load, sslam_fast.load_pretrainer, sslam_fast.load_encoder, sslam_fast.load_classifier):
    try:
        f({str(path)!r})
    except sslam_fast.CheckpointError:
        pass
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    done = in_child(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) < 200, f"{done.stdout.split()[-1]} MB more for an 887-byte file"
    step = run / "step_000000002"
    (step / "train.pt").write_bytes(hostile.huge_memo_payload())
    hostile.forge_checksums(str(step))
    rejected(step, "train.pt: not a training checkpoint", layout=False)
    resume_falls_back(run, monkeypatch, caplog, "train.pt: not a training checkpoint")


def test_deep_nesting_is_a_checkpoint_error(run, tmp_path, monkeypatch, caplog):
    path = tmp_path / "deep.pt"
    path.write_bytes(hostile.deep_nesting_payload())
    for name, load in LOADERS.items():
        with pytest.raises(CheckpointError, match=f"deep.pt: holds values nested more than {MAX_DEPTH} deep"):
            load(str(path))
    step = run / "step_000000002"
    (step / "rank_0.pt").write_bytes(hostile.deep_nesting_payload())
    hostile.forge_checksums(str(step))
    rejected(step, "rank_0.pt: holds values nested", layout=False)
    resume_falls_back(run, monkeypatch, caplog, "nested")


# --------------------------------------------------------------------------- fuzzing
def test_fuzzed_checkpoints_load_or_raise_checkpoint_error(two_checkpoints, tmp_path):
    """The short form of ``tests/fuzz_checkpoints.py`` (about a minute): random mutations of four real
    checkpoint files, each loaded in a child process with a time limit; only a load or a
    ``CheckpointError`` is accepted (README's security note gives the long form's result)."""
    import fuzz_checkpoints

    engine = two_checkpoints / "step_000000001" / "deepspeed" / "engine" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    seeds = fuzz_checkpoints.make_seeds(str(tmp_path), str(engine))
    counts, failures = fuzz_checkpoints.fuzz(seeds, cases=600, seed=19)
    assert not failures, "\n".join(failures[:20])
    for name in seeds:  # both outcomes occur for every seed: the mutations reach the loaders
        assert counts[(name, "loaded")] and counts[(name, "CheckpointError")], dict(counts)


def test_tensors_with_backward_hooks_are_refused(tmp_path):
    """torch.save never writes hooks; a crafted file's hook (an allowed global here) would be called
    in a backward pass."""
    import collections

    class HookedParameter:
        def __reduce__(self):
            return torch._utils._rebuild_parameter, (torch.zeros(2), True, collections.OrderedDict({0: set}))

    torch.save({"model": {"w": HookedParameter()}}, tmp_path / "hooks.pt")
    with pytest.raises(CheckpointError, match="hooks.pt.*backward hooks"):
        safe_load(str(tmp_path / "hooks.pt"))


def test_engine_files_may_not_set_the_state_of_an_enum_member(tmp_path):
    """DeepSpeed's ZeroStageEnum is resolved for real in engine files; its members are shared by the
    whole process, so a file may make one but not change it."""
    from deepspeed.runtime.zero.config import ZeroStageEnum

    class Tampered:
        def __reduce__(self):
            return ZeroStageEnum, (2,), {"_value_": 0}

    torch.save({"stage": Tampered()}, tmp_path / "enum.pt")
    with pytest.raises(CheckpointError, match="enum.pt.*sets the state of a ZeroStageEnum"):
        load_bytes((tmp_path / "enum.pt").read_bytes(), str(tmp_path / "enum.pt"), real=ck.deepspeed_classes())
    assert ZeroStageEnum(2).value == 2
