"""Feature extraction on the CPU: the original pipeline's execution against each inference path,
timed in ONE run with interleaved rounds (the machine's load drifts; interleaving shares it).

Pipeline, per path, for N ten-second clips (wav files): decode -> fbank -> encoder -> features
(the utterance CLS token and all tokens). Paths:

- ``original``: as the original feature extraction runs: clip by clip, the Kaldi fbank of one clip
  padded to 1024 frames (``fbank_features``), the encoder's "original" implementation in fp32
  eager, one clip per forward;
- ``fp32``: ``sslam-fast extract``'s path forced to fp32 (``--fp32``): fused implementation,
  windows of the clips encoded ``BATCH`` at a time;
- ``fp32-compiled``: the same with every block compiled (``torch.compile``; compile time in the
  warm-up, not in the timing);
- ``bf16``: the bf16 path (``released/inference.py``); ``int8``: dynamic int8 Linear layers;
- ``onnxruntime``: the project's ONNX export under onnxruntime (its CPU provider).

Each round times every path once (the order rotates per round) after one warm-up pass each; the
figure is the median over rounds. Reported per path: clips/s, ratio to ``original``, the memory
of its warm-up pass (the process's peak resident memory during it, VmHWM reset before it, less its
resident memory before it: the pass's working memory; the models themselves, loaded before, are
not in it), and the features' error against ``fp32``: max abs, and the minimum over clips of the
cosine similarity per clip (utterance, and all tokens flattened).

The model is ViT-B with random weights (no released checkpoint is available offline): the speed is
the real model's, the error figures are of random weights. The CPU model, its bf16 / AMX flags, the
thread count and the date are printed with the figures.

Also ``test_long_recordings_in_bounded_memory``: the peak resident memory of ``sslam-fast extract``
and ``sslam-fast tag --windows`` (each in its own process, the demo's small model) on a 10-minute
and a 60-minute recording, streamed (``released/stream.py``), and their real-time factor. And a
training-step entry (``test_training_step_bf16``): one stage-2 pretraining step of the
demo's small model (8 clips) and of ViT-B (1 clip, 2 views), fp32 against CPU bf16 autocast and
against the "original" implementation in fp32, interleaved, medians and the ratios.

A CPU with neither AVX512-BF16 nor AMX (nor AVX-512) is emulated on an AVX-512 machine by capping
oneDNN, MKL and ATen to AVX2 in the environment (``ONEDNN_MAX_CPU_ISA=AVX2
MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2``, with ``SSLAM_BENCH_PATHS`` leaving out bf16,
which such a CPU only emulates); the table's first line says so. Same cores and clock: a proxy for
the libraries' AVX2 code paths, not a measurement of another CPU.

Run: ``python -m pytest benchmarks/bench_inference.py -s`` (environment: SSLAM_BENCH_CLIPS, default
8; SSLAM_BENCH_ROUNDS, default 3; SSLAM_BENCH_PATHS, comma-separated subset; SSLAM_BENCH_JSON=path
writes the figures) or ``python benchmarks/bench_inference.py [--inference] [--training] [--memory] [OUT.json]`` (all three by default).
"""
import copy
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import soundfile as sf
import torch

from bench_model import fast_step
from sslam_fast.config import SSLAMConfig
from sslam_fast.pretrainer import SSLAMPretrainer
from sslam_fast.data.audio import fbank_features, load_audio
from sslam_fast.implementation import set_implementation
from sslam_fast.model import Encoder
from sslam_fast.released.encoder import AudioEncoder
from sslam_fast.released.formats import FINETUNE_FORMAT, save_pretrainer
from sslam_fast.released.export import encoder_to_onnx
from sslam_fast.released.hear import encode_windows, fbank_windows
from sslam_fast.released.inference import choose_path, cpu_info, for_inference

CLIPS = int(os.environ.get("SSLAM_BENCH_CLIPS", "8"))
ROUNDS = int(os.environ.get("SSLAM_BENCH_ROUNDS", "3"))
BATCH = 8
PATHS = ("original", "fp32", "fp32-compiled", "bf16", "int8", "onnxruntime")
RECORDINGS = ["/usr/share/asterisk/sounds/en_US_f_Allison/dir-intro.wav",
              "/usr/share/sounds/freedesktop/stereo/phone-incoming-call.oga",
              "/usr/share/sounds/alsa/Front_Center.wav"]


def write_clips(folder: str, clips: int) -> list:
    """``clips`` ten-second 16 kHz wav files: the Debian recordings looped from different offsets
    (speech, tones), or noise with tones where they are not installed."""
    sources = [load_audio(p).numpy() for p in RECORDINGS if os.path.exists(p)]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(clips):
        if sources:
            source = sources[i % len(sources)]
            start = (i * 7919) % source.shape[0]
            wave = np.resize(np.roll(source, -start), 160000)
        else:
            t = np.arange(160000) / 16000
            wave = 0.05 * rng.standard_normal(160000) + 0.2 * np.sin(2 * np.pi * (200 + 50 * i) * t)
        path = os.path.join(folder, f"clip{i}.wav")
        sf.write(path, wave.astype(np.float32), 16000, subtype="PCM_16")
        paths.append(path)
    return paths


def vit_b() -> AudioEncoder:
    torch.manual_seed(0)
    return AudioEncoder(Encoder(SSLAMConfig(stage=1))).eval()


def original_pipeline(encoder):
    set_implementation(encoder.encoder, "original")

    @torch.no_grad()
    def run(files):
        return torch.cat([encoder(fbank_features(load_audio(f))[None]) for f in files])
    return run


def windows_of(files) -> torch.Tensor:
    return torch.cat([fbank_windows(load_audio(f))[0] for f in files])


def project_pipeline(model):
    def run(files):
        return encode_windows(model, windows_of(files), BATCH)
    return run


def onnx_pipeline(encoder, folder):
    import onnxruntime

    path = os.path.join(folder, "encoder.onnx")
    encoder_to_onnx(copy.deepcopy(encoder), path)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def run(files):
        windows = windows_of(files).numpy()
        out = [session.run(None, {"fbank": windows[i : i + BATCH]})[0] for i in range(0, len(windows), BATCH)]
        return torch.from_numpy(np.concatenate(out))
    return run


def pipelines(folder: str, names) -> dict:
    encoder = vit_b()
    make = {
        "original": lambda: original_pipeline(copy.deepcopy(encoder)),
        "fp32": lambda: project_pipeline(for_inference(encoder, "cpu", "fp32")),
        "fp32-compiled": lambda: project_pipeline(for_inference(set_implementation(copy.deepcopy(encoder), "compiled"),
                                                                "cpu", "fp32")),
        "bf16": lambda: project_pipeline(for_inference(encoder, "cpu", "bf16")),
        "int8": lambda: project_pipeline(for_inference(encoder, "cpu", "int8")),
        "onnxruntime": lambda: onnx_pipeline(encoder, folder),
    }
    return {name: make[name]() for name in names}


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_mib(field: str) -> float:
    """``VmHWM`` (peak) or ``VmRSS`` (now) of this process, MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    cos = torch.nn.functional.cosine_similarity
    return {"max_abs": float((out - ref).abs().max()),
            "min_cosine_utterance": float(cos(out[:, 0], ref[:, 0], dim=1).min()),
            "min_cosine_all": float(cos(out.flatten(1), ref.flatten(1), dim=1).min())}


# Caps that make this CPU compute as one without AVX-512 (and so without AVX512-BF16 / AMX) would:
# oneDNN's, MKL's and ATen's kernels limited to AVX2 (set before torch loads: run in a fresh process).
ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")


def machine() -> dict:
    info = cpu_info()
    return {"cpu": info.model, "isa_caps": {k: os.environ[k] for k in ISA_CAPS if k in os.environ}, "bf16_flags": sorted(f for f in info.flags if "bf16" in f or f.startswith("amx")),
            "auto_path": choose_path("cpu", "auto").precision, "threads": torch.get_num_threads(),
            "cores_visible": os.cpu_count(), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def run_benchmark(names=None, clips: int = CLIPS, rounds: int = ROUNDS) -> dict:
    names = list(names or PATHS)
    with tempfile.TemporaryDirectory() as folder:
        files = write_clips(folder, clips)
        runs = pipelines(folder, names)
        outputs, peaks, times = {}, {}, {name: [] for name in names}
        for name in names:  # warm-up (and compile): one pass each, its peak memory above the RSS before it
            measured = _reset_peak_rss()
            before = _rss_mib("VmRSS")
            outputs[name] = runs[name](files).float()
            peaks[name] = _rss_mib("VmHWM") - before if measured else float("nan")
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                start = time.perf_counter()
                runs[name](files)
                times[name].append(time.perf_counter() - start)
    reference = outputs.get("fp32")
    base = statistics.median(times["original"]) if "original" in times else None
    figures = {"machine": machine(), "clips": clips, "rounds": rounds, "batch": BATCH, "paths": {}}
    for name in names:
        median = statistics.median(times[name])
        entry = {"clips_per_s": clips / median, "median_s": median, "round_s": times[name],
                 "pass_peak_mib": peaks[name]}
        if base is not None:
            entry["ratio_to_original"] = base / median
        if reference is not None:
            entry.update(errors(outputs[name], reference))
        figures["paths"][name] = entry
    return figures


def table(figures: dict) -> str:
    m = figures["machine"]
    caps = ", ".join(f"{k}={v}" for k, v in m.get("isa_caps", {}).items())
    lines = [f"{m['cpu']} ({', '.join(m['bf16_flags']) or 'no bf16 / AMX flags'}; auto path {m['auto_path']})"
             + (f" EMULATING A CPU WITHOUT AVX-512: {caps}" if caps else "") + ", "
             f"{m['threads']} threads of {m['cores_visible']} visible cores, torch {m['torch']}, {m['date']}; "
             f"{figures['clips']} clips of 10 s, {figures['rounds']} interleaved rounds, medians",
             f"{'path':<14} {'clips/s':>8} {'x orig':>7} {'pass MiB':>9} {'max abs':>9} {'cos utt':>9} {'cos all':>9}  rounds (s)"]
    for name, e in figures["paths"].items():
        lines.append(f"{name:<14} {e['clips_per_s']:8.3f} {e.get('ratio_to_original', float('nan')):7.2f} "
                     f"{e['pass_peak_mib']:9.0f} {e.get('max_abs', float('nan')):9.2e} "
                     f"{e.get('min_cosine_utterance', float('nan')):9.6f} {e.get('min_cosine_all', float('nan')):9.6f}  "
                     + " ".join(f"{t:.2f}" for t in e["round_s"]))
    return "\n".join(lines)


# The demo's model (sslam_fast/evaluation/demo.py) and ViT-B, stage 2, on 1024-frame clips.
TRAIN_MODELS = {
    "small": (dict(embed_dim=64, depth=4, num_heads=4, decoder_layers=2, decoder_groups=16, average_top_k_layers=4,
                   clone_batch=2), 8),
    "vit-b": (dict(clone_batch=2), 1),
}


def training_steps(model: str, rounds: int = ROUNDS) -> dict:
    """One stage-2 pretraining step (forward, backward, clip, AdamW, EMA) of the fused
    implementation in fp32 (its Linear layers through oneDNN on x86, ``cpu_gemm``) and under CPU
    bf16 autocast (fp32 weights, as the trainer's fast execution), and of the "original"
    implementation in fp32 (F.linear, MKL: the original code's execution of the model on a CPU),
    timed in interleaved rounds after one warm-up step each: medians and the ratios."""
    overrides, batch = TRAIN_MODELS[model]
    torch.manual_seed(0)
    fbank = torch.randn(batch, 1, 1024, 128) * 0.5
    variants = {"original-fp32": ("original", False), "fp32": ("fused", False), "bf16": ("fused", True)}
    steps, times, losses = {}, {}, {}
    for name, (implementation, bf16) in variants.items():
        torch.manual_seed(0)
        net = set_implementation(SSLAMPretrainer(SSLAMConfig(stage=2, **overrides)).train(), implementation)
        steps[name] = fast_step(net, fbank, torch.Generator().manual_seed(0), torch.Generator().manual_seed(1), autocast=bf16)
        losses[name], times[name] = float(steps[name]()["loss"]), []
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    medians = {p: statistics.median(t) for p, t in times.items()}
    return {"model": model, "batch": batch, "rounds": rounds, "step_s": medians, "round_s": times,
            "first_loss": losses, "bf16_speedup": medians["fp32"] / medians["bf16"],
            "fp32_vs_original": medians["original-fp32"] / medians["fp32"]}


def write_long_wav(path: str, minutes: float) -> None:
    """A 16 kHz 16-bit wav of tones in noise, written a minute at a time."""
    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", 16000, 1, "PCM_16") as f:
        for minute in range(int(minutes)):
            t = np.arange(960000) / 16000
            f.write((0.05 * rng.standard_normal(960000) + 0.2 * np.sin(2 * np.pi * (100 + 10 * minute) * t)).astype(np.float32))


def small_tagger(path: str) -> None:
    """A fine-tuning run's checkpoint form (``train.pt``) of the demo's small model with a random
    527-class AudioSet head: what ``sslam-fast tag`` loads, at the demo model's size."""
    torch.manual_seed(0)
    config = SSLAMConfig(stage=1, **TRAIN_MODELS["small"][0])
    encoder = Encoder(config)
    head = torch.nn.Linear(config.embed_dim, 527)
    state = {**{f"encoder.{k}": v for k, v in encoder.state_dict().items()},
             "head_norm.weight": torch.ones(config.embed_dim), "head_norm.bias": torch.zeros(config.embed_dim),
             "head.weight": head.weight.detach(), "head.bias": head.bias.detach()}
    torch.save({"format": FINETUNE_FORMAT, "encoder_config": dataclasses.asdict(config), "model": state,
                "config": {"data": {"task": "multilabel"}}}, path)


def streamed_memory(minutes=(10, 60)) -> list:
    """Peak resident memory of ``sslam-fast extract`` and ``sslam-fast tag --windows`` (each in
    its own process, the demo's small model) on a recording of each length, streamed
    (``released/stream.py``), and the real-time factor: streamed files keep memory flat whatever
    the length."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.path.join(root, "kernels"), os.environ.get("PYTHONPATH", "")]))
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (larger) benchmark process
    code = ("import re, sys; from sslam_fast import cli; rc = cli.main(sys.argv[1:]); "
            "print('peak_kib', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1), file=sys.stderr); "
            "sys.exit(rc)")
    out = []
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        checkpoint, tagger = os.path.join(folder, "small.pt"), os.path.join(folder, "tagger.pt")
        save_pretrainer(SSLAMPretrainer(SSLAMConfig(stage=1, **TRAIN_MODELS["small"][0])), checkpoint)
        small_tagger(tagger)
        commands = {"extract": ["extract", "--checkpoint", checkpoint, "-o", os.path.join(folder, "out.npz")],
                    "tag": ["tag", "--checkpoint", tagger, "--windows", "--json"]}
        for length in minutes:
            wav = os.path.join(folder, f"{length}min.wav")
            write_long_wav(wav, length)
            for tool, args in commands.items():
                start = time.perf_counter()
                done = subprocess.run([sys.executable, "-c", code, *args, wav, "--batch-size", "8"],
                                      env=env, capture_output=True, text=True)
                assert done.returncode == 0, done.stderr
                lines = done.stderr.splitlines()
                entry = {"tool": tool, "minutes": length, "peak_mib": int(lines[-1].split()[1]) / 1024,
                         "process_s": time.perf_counter() - start,
                         "path": next(line for line in lines if line.startswith("inference:") or "inference:" in line),
                         "rtf": [line for line in lines if "real-time factor" in line][-1]}
                if tool == "tag":
                    windows = json.loads(done.stdout)[0]["windows"]
                    entry["windows"] = len(windows)
                    entry["last_window_end_s"] = windows[-1]["end_s"]
                out.append(entry)
    return out


def _selected():
    chosen = os.environ.get("SSLAM_BENCH_PATHS")
    return [p for p in chosen.split(",") if p] if chosen else None


def test_inference_paths(benchmark):
    figures = benchmark.pedantic(run_benchmark, args=(_selected(),), rounds=1, iterations=1)
    print("\n" + table(figures))
    benchmark.extra_info.update({name: {k: v for k, v in e.items() if k != "round_s"}
                                 for name, e in figures["paths"].items()})
    if os.environ.get("SSLAM_BENCH_JSON"):
        with open(os.environ["SSLAM_BENCH_JSON"], "w") as f:
            json.dump(figures, f, indent=2)
    for name, e in figures["paths"].items():
        if name in ("bf16", "fp32-compiled", "onnxruntime", "original"):
            assert e["min_cosine_utterance"] >= 0.999 and e["min_cosine_all"] >= 0.999, name
        if name in ("fp32-compiled", "onnxruntime", "original"):  # fp32 maths: fp32's up to summation order
            assert e["max_abs"] <= 1e-4, name


@pytest.mark.parametrize("model", list(TRAIN_MODELS))
def test_training_step_bf16(benchmark, model):
    figures = benchmark.pedantic(training_steps, args=(model,), rounds=1, iterations=1)
    print(f"\n{model}: {json.dumps(figures)}")
    benchmark.extra_info.update({k: v for k, v in figures.items() if k != "round_s"})


def test_long_recordings_in_bounded_memory(benchmark):
    figures = benchmark.pedantic(streamed_memory, rounds=1, iterations=1)
    print("\n" + json.dumps(figures, indent=2))
    benchmark.extra_info["streamed"] = figures
    for tool in ("extract", "tag"):
        peaks = [e["peak_mib"] for e in figures if e["tool"] == tool]
        assert peaks[-1] < 1.2 * peaks[0], f"{tool}: memory grew with the recording's length"
    hour = next(e for e in figures if e["tool"] == "tag" and e["minutes"] == 60)
    assert abs(hour["last_window_end_s"] - 3600) < 1, "tag --windows must cover the whole hour"


if __name__ == "__main__":
    parts = [a for a in sys.argv[1:] if a.startswith("--")] or ["--inference", "--training", "--memory"]
    result = {"inference": run_benchmark(_selected()) if "--inference" in parts else None,
              "training": [training_steps(m) for m in TRAIN_MODELS] if "--training" in parts else None,
              "memory": streamed_memory() if "--memory" in parts else None}
    if result["inference"]:
        print(table(result["inference"]))
    for entry in (result["training"] or []) + (result["memory"] or []):
        print(json.dumps({k: v for k, v in entry.items() if k != "round_s"}))
    out = [a for a in sys.argv[1:] if not a.startswith("--")]
    if out:
        with open(out[0], "w") as f:
            json.dump(result, f, indent=2)
