"""The trainer under faults: corrupt or incomplete checkpoints are reported and skipped, keep_last
never prunes the last good checkpoint, and bad inputs end in one clear message with nothing written.
"""
import glob
import os
import re
import shutil
import sys

import pytest

from sslam_fast.trainer import checkpoints as ck
from sslam_fast.trainer.checkpoints import list_checkpoints

sys.path.insert(0, os.path.dirname(__file__))
from test_train import losses, run_in_process  # noqa: E402


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("faults_straight"))
    with pytest.MonkeyPatch.context() as mp:
        assert run_in_process(mp, run_dir, "train.max_steps=6") == 0
    return run_dir


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(1000)


def flip_bytes(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        block = f.read(16)
        f.seek(-len(block), os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in block))


OPTIM = "deepspeed/engine/zero_pp_rank_0_mp_rank_00_optim_states.pt"
CORRUPTIONS = {
    "truncated": lambda d: truncate(os.path.join(d, "train.pt")),
    "flipped": lambda d: flip_bytes(os.path.join(d, OPTIM)),
    "missing_rank_file": lambda d: os.remove(os.path.join(d, "rank_0.pt")),
    # checksums rewritten over the truncated file: verification passes, loading fails
    "unloadable": lambda d: (truncate(os.path.join(d, "train.pt")), ck.write_checksums(d)),
}
EXPECTED = {"truncated": "train.pt: 1000 bytes", "flipped": "optim_states.pt: SHA-256 differs",
            "missing_rank_file": "rank_0.pt: missing", "unloadable": "train.pt: cannot be read"}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_newest_checkpoint_resumes_from_the_previous_good_one(tmp_path, monkeypatch, caplog, straight,
                                                                       corruption):
    run_dir = str(tmp_path / "run")
    shutil.copytree(straight, run_dir)
    newest = os.path.join(run_dir, "step_000000006")
    CORRUPTIONS[corruption](newest)
    assert run_in_process(monkeypatch, run_dir, "train.max_steps=6") == 0
    warning = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped checkpoint")]
    assert len(warning) == 1 and newest in warning[0] and EXPECTED[corruption] in warning[0], warning
    assert "resuming from " + os.path.join(run_dir, "step_000000004") in warning[0]
    assert os.path.isdir(newest + ck.REJECTED_SUFFIX)  # kept, out of the way
    assert losses(run_dir) == losses(straight)  # steps 5 and 6 again, exactly as the first time
    assert [os.path.basename(p) for p in list_checkpoints(run_dir)] == ["step_000000004", "step_000000006"]
    assert ck.verify_checkpoint(newest) is None


def test_no_good_checkpoint_is_a_clear_error(tmp_path, monkeypatch, caplog, straight):
    run_dir = str(tmp_path / "run")
    shutil.copytree(straight, run_dir)
    for path in list_checkpoints(run_dir):
        truncate(os.path.join(path, "train.pt"))
    assert run_in_process(monkeypatch, run_dir, "train.max_steps=8") == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "no checkpoint to resume from passes verification" in errors[0]
    assert all(p in errors[0] for p in list_checkpoints(run_dir))
    assert [os.path.basename(p) for p in list_checkpoints(run_dir)] == ["step_000000004", "step_000000006"]
    assert not glob.glob(os.path.join(run_dir, "*" + ck.REJECTED_SUFFIX))


def _published(run_dir, step):
    tmp = ck.temp_dir_for(str(run_dir), step)
    os.makedirs(tmp)
    with open(os.path.join(tmp, "train.pt"), "wb") as f:
        f.write(os.urandom(2000))
    return ck.publish(tmp, str(run_dir), step, keep_last=2)


def test_keep_last_never_prunes_the_last_good_checkpoint_for_bad_newer_ones(tmp_path):
    first, second = _published(tmp_path, 10), _published(tmp_path, 20)
    truncate(os.path.join(second, "train.pt"))  # step 20 goes bad after it was published
    third = _published(tmp_path, 30)
    # keep_last=2 counts good checkpoints only: 10 and 30 stay, the bad 20 is neither counted nor deleted
    assert list_checkpoints(str(tmp_path)) == [first, second, third]
    os.remove(os.path.join(third, "train.pt"))
    assert ck.prune(str(tmp_path), keep_last=1) == []  # 10 is the last good one: kept
    fourth = _published(tmp_path, 40)
    assert list_checkpoints(str(tmp_path)) == [first, second, third, fourth]
    assert _published(tmp_path, 50) and not os.path.exists(first)  # two good newer ones now: 10 goes


# ----------------------------------------------------------------------------- clear errors
@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    from sslam_fast.data.tools import make_demo_dataset

    return make_demo_dataset(str(tmp_path_factory.mktemp("data")), 4, seconds=0.2)


def _bad_inputs(tmp_path, manifest):
    """name -> (--set overrides, what the message must say); each made under tmp_path."""
    missing = str(tmp_path / "nowhere" / "train.tsv")
    empty = tmp_path / "empty.tsv"
    empty.write_text(os.path.dirname(manifest) + "\n")
    rootless = tmp_path / "rootless.tsv"
    rootless.write_text(str(tmp_path / "no_root") + "\n" + open(manifest).read().split("\n", 1)[1])
    labelled = tmp_path / "labelled" / "train.tsv"
    labelled.parent.mkdir()
    shutil.copy(manifest, labelled)
    (tmp_path / "labelled" / "train.lbl").write_text("a\t/m/1\nb\t/m/2\n")  # 2 lines for 4 entries
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    return {
        "missing_manifest": (["data.demo_clips=0", f"data.manifest={missing}"], f"data.manifest={missing}: no such file"),
        "empty_manifest": (["data.demo_clips=0", f"data.manifest={empty}"], f"data.manifest={empty}: no entries"),
        "manifest_and_demo_clips": ([f"data.manifest={manifest}"],
                                    f"data.manifest={manifest} and config.data.demo_clips=16 are both set"),
        "root_missing": (["data.demo_clips=0", f"data.manifest={rootless}"],
                         f"data.manifest={rootless}: its root directory '{tmp_path / 'no_root'}' (line 1) does not exist"),
        "labels_misaligned": (["data.demo_clips=0", f"data.manifest={labelled}"],
                              f"{labelled.with_suffix('.lbl')}: 2 label lines for the 4 entries of data.manifest={labelled}"),
        "checkpoint_dir_not_writable": ([f"checkpoint.dir={blocker / 'run'}"], f"checkpoint.dir={blocker / 'run'} is not writable"),
    }


@pytest.mark.parametrize("case", ["missing_manifest", "empty_manifest", "manifest_and_demo_clips", "root_missing",
                                  "labels_misaligned", "checkpoint_dir_not_writable"])
def test_bad_inputs_are_one_clear_error_and_nothing_is_written(tmp_path, monkeypatch, caplog, manifest, case):
    overrides, message = _bad_inputs(tmp_path, manifest)[case]
    run_dir = tmp_path / "run"
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert run_in_process(monkeypatch, str(run_dir), *overrides) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and message in errors[0], errors
    assert "Traceback" not in caplog.text
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # no run directory, no file


def _cpu_burners(count=2):
    """Processes that keep the CPU busy, so rank start-up times drift apart as on a loaded machine."""
    import subprocess

    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def test_indivisible_global_batch_on_two_ranks_says_so_once(tmp_path):
    """Two processes under torchrun: the error is printed once (rank 0), the run writes nothing."""
    import subprocess

    from test_train import REPO, python_path, sets

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO, "sslam_fast", "train.py"), *sets(run_dir, "train.global_batch=5")]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(cmd, env=dict(env, PYTHONPATH=python_path(), OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert out.count("train.global_batch=5 is not divisible by the 2 processes") == 1, out[-3000:]
    assert not re.search(r'File "[^"]*sslam_fast/', out), out[-3000:]  # torchrun reports the exit, no frame of ours
    assert not run_dir.exists()


def test_preflight_verdict_is_the_same_on_every_rank_under_load(tmp_path):
    """The ranks started apart in time on a loaded CPU (as any launcher may start them), 10 times:
    each decides alone, before the rendezvous, so each exits 1; rank 0 prints the one line, rank 1
    nothing; no traceback, whichever rank gets there first."""
    import subprocess

    from test_train import REPO, free_port, python_path, sets

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=python_path(), OMP_NUM_THREADS="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    burners = _cpu_burners()
    try:
        for launch in range(10):
            run_dir = tmp_path / f"run{launch}"
            cmd = [sys.executable, os.path.join(REPO, "sslam_fast", "train.py"), *sets(run_dir, "train.global_batch=5")]
            port = str(free_port())
            ranks = []
            for rank in (1, 0) if launch % 2 else (0, 1):  # either rank may be first
                ranks.append((rank, subprocess.Popen(cmd, env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank), MASTER_PORT=port),
                                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
            outputs = {rank: (p.wait(timeout=300), p.stdout.read() + p.stderr.read()) for rank, p in ranks}
            for rank, p in ranks:
                p.stdout.close()
                p.stderr.close()
            assert outputs[0][0] == outputs[1][0] == 1, (launch, outputs)
            assert outputs[0][1].count("train.global_batch=5 is not divisible by the 2 processes") == 1, (launch, outputs)
            assert outputs[1][1] == "", (launch, outputs)
            assert "Traceback" not in outputs[0][1], (launch, outputs)
            assert not run_dir.exists()
    finally:
        for b in burners:
            b.kill()
            b.wait()
