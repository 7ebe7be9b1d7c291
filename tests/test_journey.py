"""README's "Pretraining on your own audio", run as written: every bash and python block of the
section, in order, in one shell (so ``$NORM`` carries over), each step consuming what the previous
one wrote by the names the README uses. Only tiny model and run sizes are appended, as ``--set``
options of the ``train.py`` and ``finetune.py`` lines. The folders are Debian's recordings:
``my_audio/`` unlabelled, ``my_labelled/<class>/`` by the demo benchmark's classes."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from sslam_fast.evaluation.benchmark import recorded_sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {
    "sslam_fast/train.py": [
        "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.clone_batch=2", "model.decoder_layers=1",
        "model.decoder_groups=8", "model.average_top_k_layers=2", "model.ema_anneal_end_step=10",
        "model.mix_window=32", "model.mix_w1_max=48", "model.mix_w2_max=96",
        "data.target_length=128", "data.num_workers=0", "train.global_batch=4", "train.max_micro_batch=4",
        "train.max_steps=3", "optim.warmup_steps=1", "optim.cosine_steps=3", "checkpoint.every_steps=3",
        "logging.every_steps=1", "logging.progress_bar=false", "logging.tensorboard=false",
    ],
    "sslam_fast/finetune.py": [
        "data.target_length=128", "data.num_workers=0", "train.global_batch=4", "train.max_micro_batch=4",
        "train.max_steps=2", "train.eval_every_steps=0", "optim.warmup_steps=1", "checkpoint.every_steps=2",
        "logging.every_steps=1", "logging.progress_bar=false", "logging.tensorboard=false",
    ],
}


def readme_blocks():
    """(language, text) of each bash / python block of README's own-audio section, in order."""
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    section = text.split("## Pretraining on your own audio", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(bash|python)\n(.*?)```", section, re.S)


def as_script(blocks):
    """One bash script: bash lines with continuations joined (the size options appended to the
    train and finetune lines), python blocks through a here-document."""
    lines = [f'sslam-fast() {{ "{sys.executable}" -m sslam_fast.cli "$@"; }}', "set -e"]
    for language, body in blocks:
        if language == "python":
            lines += [f'"{sys.executable}" - <<\'README_PYTHON\'', body.rstrip("\n"), "README_PYTHON"]
            continue
        for line in body.replace("\\\n", " ").splitlines():
            for script, sizes in SIZES.items():
                if line.startswith(f"python {script} "):
                    line = line.replace("python ", f'"{sys.executable}" ', 1) + "".join(f" --set {s}" for s in sizes)
            lines.append(line)
    return "\n".join(lines)


def run_script(script, cwd, env, timeout=600) -> subprocess.CompletedProcess:
    """bash -c ``script`` in its own process group, all of which is killed if it runs past ``timeout``."""
    process = subprocess.Popen(["bash", "-c", script], cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"README's journey ran past {timeout} s:\n{out[-2000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def test_readme_journey_from_own_audio_to_tagger_features_onnx_and_hear(tmp_path):
    sources = {label: [path for _, path in found] for label, found in recorded_sources().items()}
    classes = sorted(label for label, paths in sources.items() if len(paths) >= 3)[:3]
    if len(classes) < 2:
        pytest.skip("recordings missing: apt-get install alsa-utils sound-theme-freedesktop sound-icons")
    blocks = readme_blocks()
    assert [language for language, _ in blocks] == ["bash", "bash", "bash", "bash", "python"]
    os.makedirs(tmp_path / "my_audio")
    for label in classes:
        os.makedirs(tmp_path / "my_labelled" / label)
        for path in sources[label][:4]:
            shutil.copy(path, tmp_path / "my_labelled" / label / os.path.basename(path))
            shutil.copy(path, tmp_path / "my_audio" / f"{label}_{os.path.basename(path)}")
    for name in ("configs", "sslam_fast"):
        os.symlink(os.path.join(REPO, name), tmp_path / name)
    done = run_script(as_script(blocks), tmp_path, dict(os.environ))  # conftest put this checkout on PYTHONPATH
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]

    clean = open(tmp_path / "my_audio.clean.tsv").read().splitlines()[1:]
    assert len(clean) == len(os.listdir(tmp_path / "my_audio"))
    stats = dict(line.split() for line in open(tmp_path / "my_audio.stats").read().splitlines())
    for run in ("my_audio", "my_audio_sslam"):
        saved = torch.load(tmp_path / "runs" / run / "step_000000003" / "train.pt", weights_only=True)["config"]
        assert saved["data"]["manifest"] == "my_audio.clean.tsv"
        assert (saved["data"]["norm_mean"], saved["data"]["norm_std"]) == (float(stats["norm_mean"]), float(stats["norm_std"]))
        assert saved["model"]["stage"] == (1 if run == "my_audio" else 2)
    stage2 = [json.loads(line) for line in open(tmp_path / "runs" / "my_audio_sslam" / "metrics.jsonl")]
    assert all(line["srl_loss"] > 0 and line["grad_norm"] > 0 for line in stage2)

    tagger = torch.load(tmp_path / "runs" / "my_tagger" / "step_000000002" / "train.pt", weights_only=True)
    assert tagger["class_names"] == classes
    assert tagger["config"]["data"]["norm_mean"] == float(stats["norm_mean"])
    tagged = [line for line in done.stdout.splitlines() if line.startswith("  ")]
    assert len(tagged) == 3 * sum(len(os.listdir(tmp_path / "my_labelled" / c)) for c in classes)
    assert all(re.fullmatch(r"  [01]\.\d{3}  (\S+) \(\d+\)", line).group(1) in classes for line in tagged)
    assert "fine-tuning run" in done.stderr and f"mean {float(stats['norm_mean']):.4g}" in done.stderr

    features = np.load(tmp_path / "my_features.npz")
    assert len(features.files) == len(clean) and features[features.files[0]].shape == (32,)
    assert (tmp_path / "my_model.onnx").is_file()
