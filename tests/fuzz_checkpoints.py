"""Fuzzing the checkpoint loaders: random mutations of real checkpoint files, each loaded in a
child process with a time limit. The only accepted outcomes are a load and a ``CheckpointError``;
a signal exit, a hang or any other exception is a failure.

    python tests/fuzz_checkpoints.py --cases 20000 [--seed 0] [--timeout 20]

Seeds: a tiny pretraining checkpoint of this project (``load_pretrainer``), one in the original
fairseq layout with numpy values and an ``argparse.Namespace`` (``load_pretrainer``), an original
fine-tuned one pickling the fine-tuning enum (``load_classifier``), and a DeepSpeed engine file with
DeepSpeed's classes (the reader resume hands DeepSpeed). Mutations: bit flips, truncation, and
splices of the pickle's opcodes (delete, repeat, move or insert an opcode from elsewhere, or change
one byte of an argument), applied to ``data.pkl`` inside the zip (re-zipped, so that the pickle is
what breaks) or to the raw file. Prints the counts of outcomes; exits 1 on any failure.

The worker is one child process that loads case after case; it is restarted after a crash or a
hang. Its address space is capped (``--memory-gib``) so that a file asking for a huge allocation
meets a MemoryError (which must become a CheckpointError) rather than the machine's limits.
"""
import argparse
import collections
import io
import json
import os
import pickletools
import random
import resource
import select
import subprocess
import sys
import tempfile
import time
import zipfile
from typing import Dict, List, Tuple

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
LOADERS = ("load_pretrainer", "load_classifier", "engine")


# --------------------------------------------------------------------------- seeds
def make_seeds(directory: str, engine_file: str) -> Dict[str, Tuple[str, str]]:
    """{name: (path, loader)} of the real files mutated; ``engine_file`` is a DeepSpeed engine file
    of a real run (``deepspeed/engine/*optim_states.pt`` holds DeepSpeed's classes)."""
    import numpy as np
    import torch

    sys.path.insert(0, TESTS)
    from helpers import tiny_model
    from released_builders import original_finetuned, original_pretraining, save_with_original_enum, tiny_head
    from sslam_fast import save_pretrainer

    model = tiny_model(embed_dim=16, depth=2, num_heads=2, average_top_k_layers=2, decoder_layers=1)
    own = os.path.join(directory, "pretraining.pt")
    save_pretrainer(model, own)
    fairseq = original_pretraining(model)
    fairseq["args"] = argparse.Namespace(lr=[5e-4], seed=1)
    fairseq["extra_state"] = {"previous_best": np.float64(0.25), "order": np.arange(4, dtype=">u4")}
    original = os.path.join(directory, "fairseq.pt")
    torch.save(fairseq, original)
    finetuned = os.path.join(directory, "finetuned.pt")
    save_with_original_enum(original_finetuned(model, tiny_head(model, classes=5)), finetuned)
    return {"pretraining": (own, "load_pretrainer"), "fairseq": (original, "load_pretrainer"),
            "finetuned": (finetuned, "load_classifier"), "engine": (engine_file, "engine")}


# --------------------------------------------------------------------------- mutations
def _opcode_spans(data: bytes) -> List[Tuple[int, int]]:
    """(start, end) of each opcode of the pickle ``data`` up to where it stops parsing."""
    spans, starts = [], []
    try:
        for _, _, pos in pickletools.genops(io.BytesIO(data)):
            starts.append(pos)
    except Exception:
        pass
    for a, b in zip(starts, starts[1:] + [len(data)]):
        spans.append((a, b))
    return spans


def mutate_bytes(data: bytes, rng: random.Random) -> Tuple[bytes, str]:
    kind = rng.choice(("flip", "flip", "truncate", "splice", "splice", "splice"))
    if kind == "truncate":
        return data[:rng.randrange(len(data))], kind
    if kind == "flip":
        out = bytearray(data)
        for _ in range(rng.choice((1, 1, 2, 4, 8))):
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        return bytes(out), kind
    spans = _opcode_spans(data)
    if len(spans) < 2:
        return data[:rng.randrange(len(data))], "truncate"
    a, b = rng.choice(spans)
    c, d = rng.choice(spans)
    op = rng.choice(("delete", "repeat", "move", "insert", "argument"))
    if op == "delete":
        return data[:a] + data[b:], f"splice-{op}"
    if op == "repeat":
        return data[:b] + data[a:b] * rng.choice((1, 2, 100)) + data[b:], f"splice-{op}"
    if op == "move":
        piece = data[a:b]
        rest = data[:a] + data[b:]
        at = rng.randrange(len(rest) + 1)
        return rest[:at] + piece + rest[at:], f"splice-{op}"
    if op == "insert":
        return data[:a] + data[c:d] + data[a:], f"splice-{op}"
    if b - a > 1:
        out = bytearray(data)
        out[rng.randrange(a + 1, b)] = rng.randrange(256)
        return bytes(out), f"splice-{op}"
    return data[:a] + data[b:], "splice-delete"


def mutate_file(raw: bytes, rng: random.Random) -> Tuple[bytes, str]:
    """A mutation of the torch file ``raw``: mostly of its pickle (re-zipped), sometimes of the raw bytes."""
    if rng.random() < 0.25 or not raw.startswith(b"PK"):
        out, kind = mutate_bytes(raw, rng)
        return out, "raw-" + kind
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        members = [(info.filename, z.read(info.filename)) for info in z.infolist()]
    target = next(i for i, (name, _) in enumerate(members) if name.endswith("/data.pkl"))
    name, data = members[target]
    members[target] = (name, mutate_bytes(data, rng)[0] if data else data)
    kind = "pickle"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for member, content in members:
            z.writestr(member, content)
    return buf.getvalue(), kind


# --------------------------------------------------------------------------- the worker
WORKER = r"""
import json, os, sys, warnings
warnings.simplefilter("ignore")
answers = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)  # what the libraries print goes where stderr goes, not into the answers
import sslam_fast
from sslam_fast.serialization import CheckpointError, load_bytes
from sslam_fast.trainer.checkpoints import deepspeed_classes

def load(kind, path):
    if kind == "engine":
        with open(path, "rb") as f:
            return load_bytes(f.read(), path, real=deepspeed_classes())
    return getattr(sslam_fast, kind)(path)

print(json.dumps({"ready": True}), file=answers, flush=True)
for line in sys.stdin:
    case = json.loads(line)
    try:
        load(case["loader"], case["path"])
        outcome, detail = "loaded", ""
    except CheckpointError as e:
        outcome, detail = "CheckpointError", str(e)[-200:]
    except BaseException as e:
        outcome, detail = "other", f"{type(e).__name__}: {str(e)[-300:]}"
    print(json.dumps({"outcome": outcome, "detail": detail}), file=answers, flush=True)
"""


class Worker:
    """One child process loading cases; restarted after a crash or a hang."""

    def __init__(self, memory_gib: float):
        self.memory = int(memory_gib * (1 << 30))
        self.proc = None

    def _start(self):
        def cap():
            resource.setrlimit(resource.RLIMIT_AS, (self.memory, self.memory))

        env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "kernels")]))
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER], cwd=REPO, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, preexec_fn=cap)
        self.pending = b""
        ready = self._read(300)
        if not ready or not ready.get("ready"):
            raise RuntimeError("the fuzz worker did not start")

    def _read(self, timeout: float):
        """The next answer line, or None after ``timeout`` seconds or at the worker's exit."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
            if not chunk:
                return None
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def stop(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def run(self, loader: str, path: str, timeout: float) -> Tuple[str, str]:
        if self.proc is None:
            self._start()
        self.proc.stdin.write((json.dumps({"loader": loader, "path": path}) + "\n").encode())
        self.proc.stdin.flush()
        answer = self._read(timeout)
        if answer is not None:
            return answer["outcome"], answer["detail"]
        code = self.proc.poll()
        self.stop()
        if code is None:
            return "hang", f"no answer in {timeout} s"
        return "crash", f"exit status {code}"


def fuzz(seeds: Dict[str, Tuple[str, str]], cases: int, seed: int = 0, timeout: float = 20.0,
         memory_gib: float = 6.0, log=None) -> Tuple[collections.Counter, List[str]]:
    """Run ``cases`` mutated loads; (outcome counts by seed, the failures, each with its case)."""
    rng = random.Random(seed)
    raws = {name: open(path, "rb").read() for name, (path, _) in seeds.items()}
    counts, failures = collections.Counter(), []
    worker = Worker(memory_gib)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for case in range(cases):
                name = rng.choice(sorted(seeds))
                data, kind = mutate_file(raws[name], rng)
                path = os.path.join(tmp, f"case{case}.pt")
                with open(path, "wb") as f:
                    f.write(data)
                outcome, detail = worker.run(seeds[name][1], path, timeout)
                counts[(name, outcome)] += 1
                if outcome not in ("loaded", "CheckpointError"):
                    failures.append(f"case {case} ({name}, {kind}): {outcome}: {detail}")
                os.unlink(path)
                if log is not None and (case + 1) % 500 == 0:
                    log(f"{case + 1} cases, {len(failures)} failures")
        finally:
            worker.stop()
    return counts, failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds per case before it counts as a hang")
    parser.add_argument("--memory-gib", type=float, default=6.0, help="address-space cap of the worker")
    args = parser.parse_args(argv)
    sys.path.insert(0, REPO)
    sys.path.insert(0, TESTS)
    import pytest
    from test_train import run_in_process

    with tempfile.TemporaryDirectory() as tmp:
        with pytest.MonkeyPatch.context() as mp:
            if run_in_process(mp, os.path.join(tmp, "run"), "train.max_steps=1") != 0:
                raise RuntimeError("the tiny training run that makes the DeepSpeed seed failed")
        engine = os.path.join(tmp, "run", "step_000000001", "deepspeed", "engine",
                              "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        seeds = make_seeds(tmp, engine)
        counts, failures = fuzz(seeds, args.cases, args.seed, args.timeout, args.memory_gib,
                                log=lambda text: print(text, flush=True))
    for (name, outcome), n in sorted(counts.items()):
        print(f"{name:12s} {outcome:16s} {n}")
    print(f"{args.cases} cases (seed {args.seed}): {len(failures)} failures")
    for failure in failures:
        print(failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
