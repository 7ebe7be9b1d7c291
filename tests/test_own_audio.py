"""README's "Pretraining on your own audio": its three commands, run as written (with tiny model
and run settings appended through --set) on a folder of the recordings Debian packages ship."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ["/usr/share/sounds/alsa", "/usr/share/sounds/freedesktop/stereo"]
TINY = [
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.clone_batch=2", "model.decoder_layers=1",
    "model.decoder_groups=8", "model.average_top_k_layers=2", "model.attention=sdpa", "model.ema_anneal_end_step=10",
    "data.target_length=128", "data.backend=torch", "data.num_workers=0",
    "train.global_batch=4", "train.max_micro_batch=4", "train.max_steps=3", "train.precision=fp32",
    "optim.warmup_steps=1", "optim.cosine_steps=3", "checkpoint.every_steps=3",
    "logging.every_steps=1", "logging.progress_bar=false", "logging.tensorboard=false",
]


def readme_commands():
    """The shell block of README's own-audio section, continuation lines joined."""
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    section = text.split("## Pretraining on your own audio", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_readme_own_audio_commands_run_on_debian_recordings(tmp_path):
    files = [os.path.join(d, name) for d in SOURCES if os.path.isdir(d) for name in sorted(os.listdir(d))
             if name.endswith((".wav", ".oga")) and not os.path.islink(os.path.join(d, name))]
    if len(files) < 8:
        pytest.skip("recordings missing: apt-get install alsa-utils sound-theme-freedesktop")
    commands = readme_commands()
    assert len(commands) == 3
    assert commands[0].startswith("sslam-fast manifest ") and commands[1].startswith("sslam-fast norm-stats ")
    assert commands[2].startswith("python sslam_fast/train.py ")
    audio = tmp_path / "my_audio"
    os.makedirs(audio / "sub")
    for i, path in enumerate(files[:12]):
        shutil.copy(path, audio / ("sub" if i % 2 else "") / os.path.basename(path))
    for name in ("configs", "sslam_fast"):
        os.symlink(os.path.join(REPO, name), tmp_path / name)
    # `sslam-fast` is `python -m sslam_fast.cli` (the console script), here from this checkout
    script = "\n".join([f'sslam-fast() {{ "{sys.executable}" -m sslam_fast.cli "$@"; }}', "set -e",
                        *commands[:2], commands[2] + "".join(f" --set {s}" for s in TINY)])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.path.join(REPO, "kernels"), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    manifest = [line.split("\t") for line in open(tmp_path / "my_audio.tsv").read().splitlines()[1:]]
    assert len(manifest) == 12 and any(rel.startswith("sub/") for rel, _ in manifest)
    stats = dict(line.split() for line in open(tmp_path / "my_audio.stats").read().splitlines())
    run_dir = tmp_path / "runs" / "my_audio"
    lines = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [line["step"] for line in lines] == [1, 2, 3]
    import torch

    saved = torch.load(run_dir / "step_000000003" / "train.pt", weights_only=True)["config"]["data"]
    assert saved["manifest"] == "my_audio.tsv"
    assert saved["norm_mean"] == float(stats["norm_mean"]) and saved["norm_std"] == float(stats["norm_std"])
