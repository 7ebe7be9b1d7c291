"""Crafted checkpoints run nothing through any entry point that reads a file.

Each payload, if it ran, would create a marker file; every test checks that the marker is absent
and that the error names the file. The payloads name real, importable functions (``os.system``,
``builtins.eval``, ``subprocess.call``) at the top level, inside ``cfg`` and inside
``model["_ema"]``, in torch's zip format and in its legacy format.
"""
import builtins
import glob
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sslam_fast import CheckpointError, load_classifier, load_encoder, load_pretrainer
from sslam_fast.trainer.checkpoints import read_resume_state, verify_checkpoint, write_checksums
from sslam_fast.serialization import load_bytes, safe_load

sys.path.insert(0, os.path.dirname(__file__))
from helpers import Payload  # noqa: E402
from test_train import run_in_process  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
STAGE1 = FIXTURES / "parity_stage1" / "eat_original_tiny.pt"


def payloads(marker: str):
    return {
        "os.system": Payload(os.system, f"touch {marker}"),
        "builtins.eval": Payload(builtins.eval, f"open({marker!r}, 'w').close()"),
        "subprocess.call": Payload(subprocess.call, ["touch", marker]),
    }


def placements(payload):
    """The payload at the top level, inside cfg and inside model['_ema'] of a real original checkpoint."""
    base = torch.load(STAGE1, weights_only=True)
    top = payload
    in_cfg = dict(base, cfg=dict(base["cfg"], model=dict(base["cfg"]["model"], evil=payload)))
    ema = dict(base["model"]["_ema"], evil=payload)
    in_ema = dict(base, model=dict(base["model"], _ema=ema))
    return {"top": top, "cfg": in_cfg, "ema": in_ema}


def crafted(tmp_path, legacy=False):
    """(path, marker) for every payload and placement."""
    files = []
    for fname, payload in payloads(str(tmp_path / "marker")).items():
        for where, obj in placements(payload).items():
            path = tmp_path / f"{fname}-{where}{'-legacy' if legacy else ''}.pt"
            torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
            files.append(path)
    return files, tmp_path / "marker"


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_load_pretrainer_runs_no_payload(tmp_path, legacy):
    files, marker = crafted(tmp_path, legacy)
    assert len(files) == 9
    for path in files:
        with pytest.raises(CheckpointError, match=path.name) as err:
            load_pretrainer(str(path))
        assert "refused" in str(err.value) and ("os.system" in str(err.value) or "eval" in str(err.value)
                                                or "subprocess.call" in str(err.value) or "posix.system" in str(err.value))
        assert not marker.exists(), f"{path.name} ran its payload"


def finetuned_placements(payload):
    """The payload inside an original fine-tuned checkpoint: top level of model, cfg's
    pretrained_model_args, and as the prediction_mode itself."""
    base = torch.load(STAGE1, weights_only=True)
    state = {"model." + k: v for k, v in base["model"].items() if k != "_ema" and ".decoder." not in k}
    state.update({"head.weight": torch.zeros(527, 64), "head.bias": torch.zeros(527)})
    cfg = {"model": {"_name": "mae_image_classification", "num_classes": 527, "use_fc_norm": False,
                     "prediction_mode": "CLS_TOKEN", "pretrained_model_args": base["cfg"]}}
    pretrained = dict(base["cfg"], model=dict(base["cfg"]["model"], evil=payload))
    return {
        "ft-model": {"cfg": cfg, "model": dict(state, evil=payload)},
        "ft-pretrained-args": {"cfg": {"model": dict(cfg["model"], pretrained_model_args=pretrained)}, "model": state},
        "ft-mode": {"cfg": {"model": dict(cfg["model"], prediction_mode=payload)}, "model": state},
    }


@pytest.mark.parametrize("entry", ["load_encoder", "load_encoder_teacher", "load_classifier"])
def test_released_model_loaders_run_no_payload(tmp_path, entry):
    load = {"load_encoder": load_encoder, "load_encoder_teacher": lambda p: load_encoder(p, "teacher"),
            "load_classifier": load_classifier}[entry]
    files, marker = crafted(tmp_path)
    for fname, payload in payloads(str(marker)).items():
        for where, obj in finetuned_placements(payload).items():
            path = tmp_path / f"{fname}-{where}.pt"
            torch.save(obj, path)
            files.append(path)
    assert len(files) == 18
    for path in files:
        with pytest.raises(CheckpointError, match=path.name) as err:
            load(str(path))
        assert "refused" in str(err.value)
        assert not marker.exists(), f"{path.name} ran its payload through {entry}"


def test_the_fine_tuning_enum_placeholder_is_inert(tmp_path):
    """``<user_dir>.models.EAT_audio_classification.PredictionMode`` unpickles as a placeholder that
    only records its arguments; another global of that module, or that name in another module, is
    refused. Each global here would run a command if it were really called."""
    import types

    marker = tmp_path / "marker"

    class PredictionMode:
        def __init__(self, command):
            os.system(command)

    def system(command):
        os.system(command)

    stubs = {name: types.ModuleType(name) for name in ("EAT", "EAT.models", "EAT.models.EAT_audio_classification", "evil")}
    for path, module_name, name, obj in ((tmp_path / "enum.pt", "EAT.models.EAT_audio_classification", "PredictionMode", PredictionMode),
                                         (tmp_path / "function.pt", "EAT.models.EAT_audio_classification", "system", system),
                                         (tmp_path / "elsewhere.pt", "evil", "PredictionMode", PredictionMode)):
        obj.__module__, obj.__qualname__, obj.__name__ = module_name, name, name
        setattr(stubs[module_name], name, obj)
        sys.modules.update(stubs)
        try:
            torch.save({"model": {}, "x": Payload(obj, f"touch {marker}")}, path)
        finally:
            for module in stubs:
                sys.modules.pop(module)
    loaded = safe_load(str(tmp_path / "enum.pt"))
    assert repr(loaded["x"]) == "<placeholder for EAT.models.EAT_audio_classification.PredictionMode>"
    assert loaded["x"].args == (f"touch {marker}",)
    for name, refused in (("function.pt", "EAT.models.EAT_audio_classification.system"), ("elsewhere.pt", "evil.PredictionMode")):
        with pytest.raises(CheckpointError, match=f"{name}.*refused.*{refused}"):
            safe_load(str(tmp_path / name))
    assert not marker.exists()


def test_payload_is_really_live(tmp_path):
    """The crafted files do run their payload under plain pickle: the tests above can fail."""
    files, marker = crafted(tmp_path)
    torch.load(files[0], weights_only=False)
    assert marker.exists()


def test_unknown_class_outside_the_placeholder_packages_is_refused(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"model": {}, "x": pickle.Pickler}, path)  # a class of an importable, untrusted module
    with pytest.raises(CheckpointError, match=r"odd.pt.*_pickle.Pickler|odd.pt.*pickle.Pickler"):
        safe_load(str(path))


def test_init_from_runs_no_payload(tmp_path, monkeypatch, caplog):
    files, marker = crafted(tmp_path)
    for path in (files[0], files[4], files[8]):
        run_dir = tmp_path / f"run-{path.stem}"
        assert run_in_process(monkeypatch, str(run_dir), "train.max_steps=1", f"train.init_from={path}") == 1
        assert not marker.exists()
        assert any(path.name in r.getMessage() and "refused" in r.getMessage() for r in caplog.records)
        assert not glob.glob(str(run_dir / "step_*"))


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("saved_run")
    with pytest.MonkeyPatch.context() as mp:
        assert run_in_process(mp, str(run_dir), "train.max_steps=2") == 0
    return run_dir / "step_000000002"


def test_resume_files_load_weights_only(saved_run):
    for name in ("train.pt", "rank_0.pt"):
        torch.load(saved_run / name, weights_only=True)
    read_resume_state(str(saved_run), 0)


@pytest.mark.parametrize("target", ["train.pt", "rank_0.pt", "deepspeed/engine/mp_rank_00_model_states.pt",
                                    "deepspeed/engine/zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_resume_runs_no_payload(saved_run, tmp_path, target, monkeypatch, caplog):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(saved_run, run_dir / saved_run.name)
    marker = tmp_path / "marker"
    path = run_dir / saved_run.name / target
    state = torch.load(path, weights_only=False)
    state["evil"] = Payload(os.system, f"touch {marker}")
    torch.save(state, path)
    assert target in verify_checkpoint(str(run_dir / saved_run.name))  # the tampered file fails verification
    write_checksums(str(run_dir / saved_run.name))  # an attacker who can write files can rewrite these too
    with pytest.raises(CheckpointError, match=target.split("/")[-1]):
        read_resume_state(str(run_dir / saved_run.name), 0)
    assert run_in_process(monkeypatch, str(run_dir), "train.max_steps=3") == 1
    assert not marker.exists()
    assert any(target.split("/")[-1] in r.getMessage() and "refused" in r.getMessage() for r in caplog.records)


def test_engine_files_resolve_only_the_listed_globals(saved_run):
    """DeepSpeed's classes in its engine files are resolved only when the caller lists them."""
    optim = saved_run / "deepspeed" / "engine" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with pytest.raises(CheckpointError, match="refused.*deepspeed"):
        load_bytes(optim.read_bytes(), str(optim))
