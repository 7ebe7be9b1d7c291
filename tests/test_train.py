"""The trainer end to end on the CPU (DeepSpeed, gloo, fp32): resume equivalence for both stages,
preemption, a kill while saving, non-finite steps, and a 2-process ZeRO-2 run.

Each run is a tiny model on a few synthetic clips; losses are compared bitwise.
"""
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from sslam_fast import train
from sslam_fast.trainer.checkpoints import latest_checkpoint, list_checkpoints
from sslam_fast.pretrainer import SSLAMPretrainer


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.clone_batch=2",
    "model.decoder_layers=1", "model.decoder_groups=8", "model.average_top_k_layers=2",
    "model.attention=sdpa", "model.ema_anneal_end_step=10",
    "data.demo_clips=16", "data.target_length=128", "data.backend=torch", "data.num_workers=0",
    "train.global_batch=4", "train.max_micro_batch=4", "train.precision=fp32", "train.collapse_after=0",
    "optim.warmup_steps=2", "optim.cosine_steps=8",
    "checkpoint.every_steps=2", "checkpoint.keep_last=2",
    "logging.every_steps=1", "logging.tensorboard=false", "logging.progress_bar=false",
    "deepspeed.zero_stage=2",
]


def python_path() -> str:
    """This checkout's sslam_fast and sslam_kernels first, then whatever the caller had on PYTHONPATH."""
    return os.pathsep.join(p for p in (REPO, os.path.join(REPO, "kernels"), os.environ.get("PYTHONPATH")) if p)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sets(run_dir, *extra):
    args = []
    for item in TINY + [f"checkpoint.dir={run_dir}", *extra]:
        args += ["--set", item]
    return args


def run_in_process(mp, run_dir, *extra) -> int:
    """One training session in this process, as `python sslam_fast/train.py` would run it."""
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port())).items():
        mp.setenv(key, value)
    return train.main(sets(run_dir, *extra))


def trainer_in_process(mp, run_dir, *extra):
    """A Trainer built in this process (one rank) on the tiny settings, for tests that look inside it."""
    from sslam_fast.trainer.config import load_config

    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port())).items():
        mp.setenv(key, value)
    args = [a for a in sets(run_dir, *extra) if a != "--set"]
    return train.Trainer(load_config(None, args), train.init_distributed())


def logged(run_dir):
    """step -> metrics line (the last line written for that step)."""
    lines = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {line["step"]: line for line in lines}


def losses(run_dir):
    return {step: line["loss"] for step, line in logged(run_dir).items()}


def patch_forward(mp, on_call):
    """Wrap SSLAMPretrainer.forward; ``on_call(n, out)`` sees the n-th call (1-based) and its output."""
    original = SSLAMPretrainer.forward
    calls = [0]

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls[0] += 1
        on_call(calls[0], out)
        return out

    mp.setattr(SSLAMPretrainer, "forward", forward)
    return calls


def sigterm_at(n):
    def on_call(call, out):
        if call == n:
            os.kill(os.getpid(), signal.SIGTERM)
    return on_call


@pytest.fixture(scope="module")
def stage1_straight(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("stage1_straight"))
    with pytest.MonkeyPatch.context() as mp:
        assert run_in_process(mp, run_dir, "train.max_steps=6", "logging.tensorboard=true") == 0
    return run_dir


def test_stage1_straight_run_learns_and_checkpoints(stage1_straight):
    lines = logged(stage1_straight)
    assert sorted(lines) == [1, 2, 3, 4, 5, 6]
    assert all(line["skipped"] == 0 and line["bad_steps"] == 0 for line in lines.values())
    assert all(line["clips_per_s"] > 0 and line["data_ms"] >= 0 and line["compute_ms"] > 0 for line in lines.values())
    assert [lines[s]["lr"] for s in (1, 2, 3)] == pytest.approx([0, 2.5e-4, 5e-4])  # warmup 2 to the peak
    assert os.listdir(os.path.join(stage1_straight, "tb"))  # TensorBoard events
    # keep_last=2 of the saves at 2, 4, 6
    assert [os.path.basename(p) for p in list_checkpoints(stage1_straight)] == ["step_000000004", "step_000000006"]
    ckpt = torch.load(os.path.join(latest_checkpoint(stage1_straight), "train.pt"), weights_only=False)
    assert ckpt["format"] == "sslam-fast/train" and ckpt["step"] == 6 and ckpt["config"]["model"]["embed_dim"] == 32
    keys = set(ckpt["model"])
    assert any(k.startswith("student.") for k in keys) and any(k.startswith("teacher.") for k in keys)
    assert any(k.startswith("decoder.") for k in keys)
    # the teacher moved away from its initial copy of the student, but is not the student
    assert not torch.equal(ckpt["model"]["teacher.cls_token"], ckpt["model"]["student.cls_token"])


def test_stage1_resume_after_sigterm_is_bitwise_identical(tmp_path, monkeypatch, caplog, stage1_straight):
    run_dir = str(tmp_path)
    patch_forward(monkeypatch, sigterm_at(3))
    assert run_in_process(monkeypatch, run_dir, "train.max_steps=6") == 0
    assert [os.path.basename(p) for p in list_checkpoints(run_dir)] == ["step_000000002", "step_000000003"]
    assert sorted(logged(run_dir)) == [1, 2, 3]
    monkeypatch.undo()
    assert run_in_process(monkeypatch, run_dir, "train.max_steps=6") == 0
    assert losses(run_dir) == losses(stage1_straight)
    assert run_in_process(monkeypatch, run_dir, "train.max_steps=7", "model.depth=3") == 1
    assert "model.depth is 2 in the checkpoint and 3 now" in caplog.text
    a = torch.load(os.path.join(latest_checkpoint(run_dir), "train.pt"), weights_only=False)["model"]
    b = torch.load(os.path.join(latest_checkpoint(stage1_straight), "train.pt"), weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# stage 2 on 128 frames: two unmixed 32-frame windows
STAGE2 = ["model.stage=2", "model.clone_batch=1", "model.mix_window=32", "model.mix_w1_max=32",
          "model.mix_w2_max=96", "optim.lr=5e-5"]


def test_stage2_from_stage1_checkpoint_resumes_bitwise(tmp_path, monkeypatch, stage1_straight):
    init = f"train.init_from={latest_checkpoint(stage1_straight)}"
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    assert run_in_process(monkeypatch, straight, *STAGE2, init, "train.max_steps=4") == 0
    lines = logged(straight)
    assert sorted(lines) == [1, 2, 3, 4] and all(line["srl_loss"] > 0 for line in lines.values())
    assert (lines[1]["lr"], lines[2]["lr"], lines[3]["lr"]) == pytest.approx((0, 5e-5 / 2, 5e-5))  # a fresh schedule

    patch_forward(monkeypatch, sigterm_at(2))
    assert run_in_process(monkeypatch, interrupted, *STAGE2, init, "train.max_steps=4") == 0
    monkeypatch.undo()
    assert run_in_process(monkeypatch, interrupted, *STAGE2, init, "train.max_steps=4") == 0
    assert losses(interrupted) == losses(straight)


def test_stage2_starts_from_the_stage1_weights(tmp_path, monkeypatch, stage1_straight):
    source = latest_checkpoint(stage1_straight)
    calls = []
    patch_forward(monkeypatch, lambda n, out: calls.append(n))
    monkeypatch.setattr(train.Trainer, "run", lambda self: (self.save(), 0)[1])  # save step 0 and stop
    assert run_in_process(monkeypatch, str(tmp_path), *STAGE2, f"train.init_from={source}") == 0
    assert not calls
    a = torch.load(os.path.join(tmp_path, "step_000000000", "train.pt"), weights_only=False)["model"]
    b = torch.load(os.path.join(source, "train.pt"), weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stage2_from_an_original_eat_checkpoint(tmp_path, monkeypatch):
    from sslam_fast.released.formats import load_pretrainer

    source = os.path.join(REPO, "tests", "fixtures", "parity_stage1", "eat_original_tiny.pt")
    eat = ["model.embed_dim=64", "model.depth=12", "model.num_heads=4", "model.average_top_k_layers=12",
           "model.decoder_layers=6", "model.decoder_groups=16", *STAGE2, f"train.init_from={source}"]
    with monkeypatch.context() as mp:
        mp.setattr(train.Trainer, "run", lambda self: (self.save(), 0)[1])  # save step 0 and stop
        assert run_in_process(mp, str(tmp_path), *eat) == 0
    saved = torch.load(tmp_path / "step_000000000" / "train.pt", weights_only=False)["model"]
    original = load_pretrainer(source).state_dict()
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)
    assert run_in_process(monkeypatch, str(tmp_path), *eat, "train.max_steps=1") == 0  # resumes at 0, trains
    assert logged(str(tmp_path))[1]["srl_loss"] > 0 and logged(str(tmp_path))[1]["skipped"] == 0


KILL_WHILE_SAVING = textwrap.dedent("""
    import os, signal, sys
    from sslam_fast import train
    from sslam_fast.trainer import loop
    save = loop.atomic_save
    def killed_while_saving(obj, path):
        if "step_000000004" in path and path.endswith("train.pt"):
            os.kill(os.getpid(), signal.SIGKILL)
        save(obj, path)
    loop.atomic_save = killed_while_saving
    sys.exit(train.main(sys.argv[1:]))
""")


def test_killed_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch, stage1_straight):
    run_dir = str(tmp_path / "run")
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), PYTHONPATH=python_path())
    proc = subprocess.run([sys.executable, "-c", KILL_WHILE_SAVING, *sets(run_dir, "train.max_steps=6")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert os.path.isdir(os.path.join(run_dir, ".tmp-step_000000004"))
    assert [os.path.basename(p) for p in list_checkpoints(run_dir)] == ["step_000000002"]

    assert run_in_process(monkeypatch, run_dir, "train.max_steps=6") == 0
    assert not os.path.exists(os.path.join(run_dir, ".tmp-step_000000004"))
    assert losses(run_dir) == losses(stage1_straight)


def test_non_finite_steps_are_skipped_and_counted(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="sslam_fast.train")
    def poison(n, out):
        if n in (2, 3):
            out["loss"] = out["loss"] * float("nan")

    calls = patch_forward(monkeypatch, poison)
    assert run_in_process(monkeypatch, str(tmp_path), "train.max_steps=4") == 0
    assert calls[0] == 6  # 4 updates + 2 skipped
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [line["skipped"] for line in lines] == [0, 1, 1, 0, 0, 0]
    assert [line["step"] for line in lines] == [1, 1, 1, 2, 3, 4]
    assert lines[-1]["bad_steps"] == 2
    assert all(line["loss"] == "nan" for line in lines[1:3])
    assert all(isinstance(line["loss"], float) for line in lines[3:])
    assert torch.load(tmp_path / "step_000000004" / "train.pt", weights_only=False)["counters"]["bad_total"] == 2
    assert "non-finite steps skipped 2" in caplog.text  # the final summary


def test_too_many_non_finite_steps_stop_the_run(tmp_path, monkeypatch, caplog):
    def poison(n, out):
        if n >= 2:
            out["loss"] = out["loss"] * float("inf")

    calls = patch_forward(monkeypatch, poison)
    assert run_in_process(monkeypatch, str(tmp_path), "train.max_steps=10", "train.max_bad_steps=3") == 2
    assert calls[0] == 4
    assert "3 non-finite steps in a row (train.max_bad_steps=3)" in caplog.text
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == []  # nothing after step 1 to save


def test_collapse_is_detected_and_reported(tmp_path, monkeypatch, caplog):
    def collapse(n, out):
        if n >= 3:
            out["target_var"] = out["target_var"] * 0

    patch_forward(monkeypatch, collapse)
    assert run_in_process(monkeypatch, str(tmp_path), "train.max_steps=4") == 0
    assert "representation collapse? target_var 0" in caplog.text
    assert logged(str(tmp_path))[4]["collapse_steps"] == 2
    monkeypatch.undo()
    patch_forward(monkeypatch, collapse)
    assert run_in_process(monkeypatch, str(tmp_path / "b"), "train.max_steps=4", "train.stop_on_collapse=true") == 2
    assert "collapse at step 3" in caplog.text


def test_variances_are_computed_on_logging_steps_only(tmp_path, monkeypatch, caplog):
    """target_var / pred_var (and the collapse guard) on the steps that write a metrics line, every
    logging.every_steps and the last; the other steps skip them, and their lines average the
    losses of every step of the window."""
    computed = []
    patch_forward(monkeypatch, lambda n, out: computed.append("target_var" in out and "pred_var" in out))
    assert run_in_process(monkeypatch, str(tmp_path), "train.max_steps=5", "logging.every_steps=2") == 0
    assert computed == [False, True, False, True, True]
    lines = logged(str(tmp_path))
    assert sorted(lines) == [2, 4, 5]
    assert all(line["target_var"] > 0 and line["pred_var"] > 0 for line in lines.values())
    monkeypatch.undo()

    def collapse(n, out):
        if "target_var" in out:
            out["target_var"] = out["target_var"] * 0

    patch_forward(monkeypatch, collapse)
    assert run_in_process(monkeypatch, str(tmp_path / "b"), "train.max_steps=5", "logging.every_steps=2") == 0
    assert logged(str(tmp_path / "b"))[5]["collapse_steps"] == 3  # steps 2, 4, 5


TWO_RANKS = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    from sslam_fast import train
    from sslam_fast.trainer.config import load_config
    out, args = sys.argv[1], sys.argv[2:]
    cfg = load_config(None, [a for a in args if a != "--set"])
    trainer = train.Trainer(cfg, train.init_distributed())
    seen, next_batch = [], trainer.data.next
    def recording():
        batch = next_batch()
        seen.extend(batch["index"].tolist())
        return batch
    trainer.data.next = recording
    named = lambda m: {n: p.detach().float().clone() for n, p in m.named_parameters()}
    init = {"trainable": named(trainer.trainable), "teacher": named(trainer.model.teacher)}
    status = trainer.run()
    torch.save({"status": status, "seen": seen, "plan": trainer.plan, "init": init,
                "trainable": named(trainer.trainable), "teacher": named(trainer.model.teacher)},
               os.path.join(out, f"rank{dist.get_rank()}.pt"))
    dist.destroy_process_group()
""")


def test_two_process_zero2_keeps_ranks_identical_and_shards_disjoint(tmp_path):
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path), *sets(run_dir, "train.max_steps=3", "deepspeed.zero_stage=2")]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(cmd, env=dict(env, PYTHONPATH=python_path(), OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["status"] == r1["status"] == 0
    assert r0["plan"].micro_batch == 2 and r0["plan"].accumulation == 1
    for part in ("trainable", "teacher"):
        assert r0[part].keys() == r1[part].keys() == r0["init"][part].keys() and r0[part]
        for name, value in r0[part].items():
            assert torch.equal(value, r1[part][name]), (part, name)
            assert torch.equal(r0["init"][part][name], r1["init"][part][name]), (part, name)
    # three steps moved every trainable tensor, and the EMA moved the teacher
    assert all(not torch.equal(v, r0["init"]["trainable"][n]) for n, v in r0["trainable"].items())
    assert all(not torch.equal(v, r0["init"]["teacher"][n]) for n, v in r0["teacher"].items())
    assert len(r0["seen"]) == len(r1["seen"]) == 6
    assert not set(r0["seen"]) & set(r1["seen"])
    ckpt = torch.load(run_dir / "step_000000003" / "train.pt", weights_only=False)
    assert ckpt["world_size"] == 2
    # the checkpoint's fp32 student, decoder and teacher are the ones both ranks hold (fp32 masters
    # == weights in fp32)
    saved = {k: v for k, v in ckpt["model"].items() if not k.startswith("teacher.")}
    assert saved.keys() == r0["trainable"].keys()
    for name, value in r0["trainable"].items():
        assert torch.equal(saved[name], value), name
    for name, value in r0["teacher"].items():
        assert torch.equal(ckpt["model"]["teacher." + name], value), name


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_bf16_teacher_follows_the_fp32_masters(tmp_path, monkeypatch, zero_stage):
    trainer = trainer_in_process(monkeypatch, tmp_path, "train.max_steps=2", "train.precision=bf16",
                                 f"deepspeed.zero_stage={zero_stage}")
    sources = []
    update = trainer.model.update_teacher
    monkeypatch.setattr(trainer.model, "update_teacher",
                        lambda step, params: (sources.append([p.clone() for p in params]), update(step, params))[1])
    assert trainer.run() == 0
    student = list(trainer.model.student.parameters())
    assert len(sources) == 2 and all(p.dtype == torch.bfloat16 for p in student)
    masters = sources[-1]
    assert all(m.dtype == torch.float32 for m in masters)
    assert all(torch.equal(m.to(torch.bfloat16), p) for m, p in zip(masters, student))
    assert any(not torch.equal(m, p.float()) for m, p in zip(masters, student))  # real fp32, not upcast bf16
    assert all(t.dtype == torch.float32 for t in trainer.model.teacher.parameters())
    saved = torch.load(tmp_path / "step_000000002" / "train.pt", weights_only=False)["model"]
    names = [n for n, _ in trainer.model.student.named_parameters()]
    assert all(torch.equal(saved[f"student.{n}"], m) for n, m in zip(names, masters))


class _ListLoader:
    """A loader stand-in: yields the given batches, then raises ``error`` if set."""

    def __init__(self, n, error=None):
        self.n, self.error, self.position = n, error, 0

    def __iter__(self):
        while self.position < self.n:
            self.position += 1
            yield {"fbank": torch.full((1,), float(self.position))}
        if self.error:
            raise self.error

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def test_prefetcher_reports_the_position_of_the_consumed_batch_and_forwards_errors():
    from sslam_fast.trainer.prefetch import Prefetcher

    data = Prefetcher(_ListLoader(5, ValueError("bad shard")), torch.device("cpu"), depth=3)
    assert data.next()["fbank"].item() == 1
    time.sleep(0.2)  # let the thread read ahead
    assert data.loader.position > 1 and data.state_dict() == {"position": 1}
    assert [data.next()["fbank"].item() for _ in range(4)] == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="bad shard"):
        data.next()
    data.close()
    resumed = Prefetcher(_ListLoader(5), torch.device("cpu"))
    resumed.load_state_dict({"position": 3})
    assert resumed.next()["fbank"].item() == 4 and resumed.state_dict() == {"position": 4}
    resumed.close()
