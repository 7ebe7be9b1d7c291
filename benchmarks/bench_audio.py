"""Front end throughput on 10-second 32 kHz clips: each backend next to a per-clip reference.

The reference does what the original SSLAM loader does for every clip, one at a time: decode,
torchaudio's resample (sinc kernel rebuilt on every call, conv1d) and torchaudio's kaldi.fbank
(window and mel banks rebuilt on every call, as torchaudio does), then pad and normalise. It is
written here from those algorithms because torchaudio cannot be installed beside this torch.

Loader entries come two ways: one cold epoch (`build_loader(infinite=False)`, worker start-up
included) and steady state (an infinite loader, as in training: WARMUP_BATCHES batches first, then
STEADY_BATCHES timed batches per round, worker start-up excluded).
Run: pytest benchmarks/bench_audio.py --benchmark-columns=min,mean,rounds
Each entry's extra_info holds clips_per_s and speedup (vs the reference of the same run).
"""

import math
import os
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sslam_fast.data import audio
from sslam_fast.data import build_loader

NUM_CLIPS = 64
BATCH = 8
WARMUP_BATCHES = 3
STEADY_BATCHES = NUM_CLIPS // BATCH
RATE = 32000
SECONDS = 10.0
SETTLE_S = 0.5
RESULTS = {}
# The configuration the 3x goal is checked on: the torch loader with 2 workers (one per
# core of the development machine) in steady state, interleaved round by round with the reference.
TARGET_WORKERS = 2


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    sf = pytest.importorskip("soundfile")
    root = tmp_path_factory.mktemp("bench_clips")
    rng = np.random.default_rng(0)
    n = int(RATE * SECONDS)
    t = np.arange(n) / RATE
    rows = []
    for i in range(NUM_CLIPS):
        wave = 0.1 * rng.standard_normal(n) + 0.3 * np.sin(2 * np.pi * (200 + 300 * (i % 16)) * t)
        sf.write(root / f"clip_{i:03d}.wav", wave.astype(np.float32), RATE, subtype="PCM_16")
        rows.append(f"clip_{i:03d}.wav\t{n}\n")
    (root / "train.tsv").write_text(f"{root}\n" + "".join(rows))
    return str(root / "train.tsv"), [str(root / f"clip_{i:03d}.wav") for i in range(NUM_CLIPS)]


def reference_resample(wave, orig, new):
    g = math.gcd(orig, new)
    orig, new = orig // g, new // g
    base = min(orig, new) * 0.99
    width = math.ceil(6 * orig / base)
    idx = torch.arange(-width, width + orig, dtype=wave.dtype, device=wave.device)[None, None] / orig
    t = (torch.arange(0, -new, -1, dtype=wave.dtype, device=wave.device)[:, None, None] / new + idx) * base
    t = t.clamp(-6, 6)
    window = torch.cos(t * math.pi / 12) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.tensor(1.0, device=wave.device), t.sin() / t) * window * (base / orig)
    out = F.conv1d(F.pad(wave[None], (width, width + orig))[:, None], kernel, stride=orig)
    return out.transpose(1, 2).reshape(-1)[: math.ceil(new * wave.shape[0] / orig)]


def reference_fbank(wave):
    frames = wave.unfold(0, 400, 160)
    frames = frames - frames.mean(dim=1, keepdim=True)
    shifted = F.pad(frames.unsqueeze(0), (1, 0), mode="replicate").squeeze(0)
    frames = (frames - 0.97 * shifted[:, :-1]) * torch.hann_window(400, periodic=False, device=wave.device)
    power = torch.fft.rfft(F.pad(frames, (0, 112))).abs().pow(2.0)
    mel = lambda f: 1127.0 * (1.0 + f / 700.0).log()  # noqa: E731
    lo, hi = 1127.0 * math.log(1 + 20 / 700), 1127.0 * math.log(1 + 8000 / 700)
    delta = (hi - lo) / 129
    b = torch.arange(128).unsqueeze(1)
    m = mel(31.25 * torch.arange(256)).unsqueeze(0)
    up = (m - (lo + b * delta)) / delta
    down = ((lo + (b + 2.0) * delta) - m) / delta
    banks = F.pad(torch.clamp(torch.min(up, down), min=0.0), (0, 1)).to(wave.device)
    return torch.max(torch.mm(power, banks.T), torch.tensor(torch.finfo(torch.float).eps, device=wave.device)).log()


def reference_features(path):
    import soundfile as sf

    wave, rate = sf.read(path, dtype="float32")
    wave = torch.from_numpy(wave)
    wave = reference_resample(wave, rate, 16000)
    fbank = reference_fbank(wave - wave.mean())
    fbank = F.pad(fbank, (0, 0, 0, 1024 - fbank.shape[0])) if fbank.shape[0] < 1024 else fbank[:1024]
    return (fbank + 4.268) / (2 * 4.569)


def record(benchmark, name, clips_per_round):
    if benchmark.stats is None:  # --benchmark-disable: the functions ran once, nothing to record
        return
    seconds = benchmark.stats.stats.min
    RESULTS[name] = clips_per_round / seconds
    benchmark.extra_info["clips_per_s"] = round(RESULTS[name], 1)
    benchmark.extra_info["threads"] = torch.get_num_threads()
    if "reference" in RESULTS and name != "reference":
        benchmark.extra_info["speedup"] = round(RESULTS[name] / RESULTS["reference"], 2)


def test_reference_per_clip(benchmark, clips):
    _, paths = clips
    out = benchmark.pedantic(lambda: [reference_features(p) for p in paths], rounds=5, iterations=1, warmup_rounds=1)
    torch.testing.assert_close(out[0], audio.load_features(paths[0]), rtol=0, atol=1e-3)
    record(benchmark, "reference", len(paths))


def _epoch(manifest, backend, workers, device=None):
    loader = build_loader(manifest, batch_size=BATCH, backend=backend, num_workers=workers, infinite=False, device=device)
    return [b["fbank"] for b in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_torch_loader_cpu(benchmark, clips, workers):
    """One cold epoch: the worker start-up is paid every round."""
    manifest, _ = clips
    out = benchmark.pedantic(lambda: _epoch(manifest, "torch", workers), rounds=3, iterations=1, warmup_rounds=1)
    assert sum(b.shape[0] for b in out) == NUM_CLIPS
    record(benchmark, f"torch_cpu_workers{workers}", NUM_CLIPS)


@pytest.mark.parametrize("workers", [0, 2])
def test_dali_loader_cpu(benchmark, clips, workers):
    pytest.importorskip("nvidia.dali", reason="DALI not installed")
    manifest, _ = clips
    out = benchmark.pedantic(lambda: _epoch(manifest, "dali", workers), rounds=3, iterations=1, warmup_rounds=1)
    assert sum(b.shape[0] for b in out) == NUM_CLIPS
    record(benchmark, f"dali_cpu_workers{workers}", NUM_CLIPS)


def _steady(benchmark, manifest, backend, workers, name):
    """An infinite loader as in training: WARMUP_BATCHES batches (worker start-up, first slots),
    then each round times STEADY_BATCHES batches."""
    batches = iter(build_loader(manifest, batch_size=BATCH, backend=backend, num_workers=workers, infinite=True))
    try:
        for _ in range(WARMUP_BATCHES):
            next(batches)
        out = benchmark.pedantic(lambda: [next(batches)["fbank"] for _ in range(STEADY_BATCHES)], rounds=5, iterations=1)
    finally:
        batches.close()  # shuts the workers down
    assert all(b.shape == (BATCH, 1, audio.TARGET_LENGTH, audio.NUM_MEL_BINS) for b in out)
    record(benchmark, name, STEADY_BATCHES * BATCH)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on 2 cores, on purpose
@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_torch_loader_cpu_steady(benchmark, clips, workers):
    _steady(benchmark, clips[0], "torch", workers, f"torch_cpu_steady_workers{workers}")


@pytest.mark.parametrize("workers", [0, 2])
def test_dali_loader_cpu_steady(benchmark, clips, workers):
    pytest.importorskip("nvidia.dali", reason="DALI not installed")
    _steady(benchmark, clips[0], "dali", workers, f"dali_cpu_steady_workers{workers}")


def test_target_cpu_loader_interleaved(benchmark, clips):
    """The issue's CPU goal, measured so that machine speed drifts hit both sides alike: each round
    times the per-clip reference over the clips, then discards WARMUP_BATCHES batches of the
    running 2-worker loader (its queue, filled while the reference ran, is emptied and the workers
    are busy again) and times STEADY_BATCHES batches. Before each reference round the loader is
    left SETTLE_S seconds to refill its queue, so its workers do not compete with the reference."""
    manifest, paths = clips
    reference_s = []
    batches = iter(build_loader(manifest, batch_size=BATCH, backend="torch", num_workers=TARGET_WORKERS, infinite=True))

    def setup():
        time.sleep(SETTLE_S)
        start = time.perf_counter()
        [reference_features(p) for p in paths]
        reference_s.append(time.perf_counter() - start)
        for _ in range(WARMUP_BATCHES):
            next(batches)

    try:
        out = benchmark.pedantic(lambda: [next(batches)["fbank"] for _ in range(STEADY_BATCHES)], setup=setup, rounds=5, iterations=1)
    finally:
        batches.close()
    assert all(b.shape == (BATCH, 1, audio.TARGET_LENGTH, audio.NUM_MEL_BINS) for b in out)
    if benchmark.stats is None:
        return
    RESULTS["target_reference"] = len(paths) / min(reference_s)
    RESULTS["target_loader"] = STEADY_BATCHES * BATCH / benchmark.stats.stats.min
    benchmark.extra_info["clips_per_s"] = round(RESULTS["target_loader"], 1)
    benchmark.extra_info["reference_clips_per_s"] = round(RESULTS["target_reference"], 1)
    benchmark.extra_info["speedup"] = round(RESULTS["target_loader"] / RESULTS["target_reference"], 2)
    benchmark.extra_info["threads"] = torch.get_num_threads()


def test_fbank_only_cpu(benchmark, clips):
    """kaldi_fbank + pad + normalise on already resampled clips, batched in the main process."""
    _, paths = clips
    waves = torch.stack([audio.subtract_mean(audio.load_audio(p)) for p in paths])
    benchmark.pedantic(lambda: audio.normalise(audio.pad_or_crop(audio.kaldi_fbank(waves))), rounds=3, iterations=1, warmup_rounds=1)
    record(benchmark, "fbank_only_cpu", NUM_CLIPS)



def test_dali_fbank_only_cpu(benchmark, clips):
    """The spectral half of the DALI graph (framing, spectrogram, pad/crop; mel, log and
    normalisation in torch) on the same pre-resampled clips as test_fbank_only_cpu, batches of BATCH."""
    pytest.importorskip("nvidia.dali", reason="DALI not installed")
    from sslam_fast.data.dali import DaliFbank

    _, paths = clips
    waves = [audio.subtract_mean(audio.load_audio(p)) for p in paths]
    fbank = DaliFbank(BATCH, device_id=None, num_threads=2)
    run = lambda: [audio.normalise(fbank(waves[i : i + BATCH])) for i in range(0, NUM_CLIPS, BATCH)]  # noqa: E731
    out = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    want = audio.normalise(audio.pad_or_crop(audio.kaldi_fbank(waves[0])))
    loud = want > (-10.0 - audio.NORM_MEAN) / (2 * audio.NORM_STD)
    torch.testing.assert_close(out[0][0][loud], want[loud], rtol=0, atol=1e-3)
    record(benchmark, "dali_fbank_only_cpu", NUM_CLIPS)


def gpu_clips(batch, rate):
    """`batch` 10-second clips at `rate` (noise plus a tone) made on the GPU: the device image has no
    soundfile, and decoding is CPU work that the GPU figures must not include."""
    g = torch.Generator(device="cuda").manual_seed(0)
    n = int(rate * SECONDS)
    t = torch.arange(n, device="cuda") / rate
    tones = torch.sin(2 * math.pi * (200 + 300 * torch.arange(batch, device="cuda")[:, None] % 20) * t)
    return 0.1 * torch.randn(batch, n, device="cuda", generator=g) + 0.3 * tones


def gpu_entry(benchmark, work, name, clips, rounds=20, warmup_rounds=3):
    """Time `work()` followed by a synchronize, and record `clips` per round under `name`."""

    def run():
        out = work()
        torch.cuda.synchronize()
        return out

    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)
    record(benchmark, name, clips)
    benchmark.extra_info["device"] = torch.cuda.get_device_name()


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [64, 256])
def test_fbank_gpu(benchmark, batch):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    waves = audio.subtract_mean(gpu_clips(batch, 16000))
    gpu_entry(benchmark, lambda: audio.normalise(audio.pad_or_crop(audio.kaldi_fbank(waves))), f"fbank_gpu_batch{batch}", batch)


@pytest.mark.gpu
def test_dali_fbank_gpu(benchmark):
    """The DALI graph's spectral half on the GPU, 64 clips per run (waveforms fed from the CPU)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    pytest.importorskip("nvidia.dali", reason="DALI not installed")
    from sslam_fast.data.dali import DaliFbank

    batch = 64
    waves = [w for w in audio.subtract_mean(gpu_clips(batch, 16000)).cpu()]
    fbank = DaliFbank(batch, device_id=torch.cuda.current_device(), num_threads=4)
    gpu_entry(benchmark, lambda: audio.normalise(fbank(waves)), f"dali_fbank_gpu_batch{batch}", batch, rounds=10, warmup_rounds=2)


@pytest.mark.gpu
def test_resample_and_fbank_gpu(benchmark):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    raw = gpu_clips(256, RATE)

    def work():
        waves = audio.subtract_mean(audio.resample(raw, RATE, 16000))
        return audio.normalise(audio.pad_or_crop(audio.kaldi_fbank(waves)))

    gpu_entry(benchmark, work, "resample_fbank_gpu_batch256", raw.shape[0])


@pytest.mark.gpu
def test_reference_per_clip_gpu(benchmark):
    """The per-clip reference on the GPU (16 clips one at a time), for the ratio on that card."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    raw = gpu_clips(16, RATE)
    gpu_entry(benchmark, lambda: [reference_fbank(reference_resample(w, RATE, 16000)) for w in raw], "reference_per_clip_gpu",
              raw.shape[0], rounds=5, warmup_rounds=1)


# The fast step (benchmarks/bench_model.py, ViT-B at 50% MFU) consumes this many clips per second
# per GPU; the data path keeps up when the step seldom waits for it.
STEP_CLIPS_PER_S = 450
STEP_BATCH = 12


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.skipif((os.cpu_count() or 1) < 16, reason="needs a GPU host with 16 cores or more")
@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_data_wait_at_step_rate_gpu(benchmark, clips, backend):
    """The trainer's data path (loader + Prefetcher, features on the GPU) drained at the fast
    step's rate: each batch of 12 is followed by a 12 / 450 s pause standing in for the step.
    Reports data_wait_frac (waiting for data / (waiting + step)), clips/s and clips/s per loader
    core. Needs a GPU host with 16 cores or more (one rank's share of an 8-GPU, 128-core node)."""
    cores = os.cpu_count()
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI not installed")
    from sslam_fast.trainer.prefetch import Prefetcher

    workers = cores - 2  # the training thread and the prefetch thread keep a core each
    device = torch.device("cuda")
    loader = build_loader(clips[0], batch_size=STEP_BATCH, backend=backend, num_workers=workers, device=device)
    data = Prefetcher(loader, device, depth=2)
    step_s = STEP_BATCH / STEP_CLIPS_PER_S
    for _ in range(WARMUP_BATCHES):
        data.next()
    waits = []

    def run():
        wait = 0.0
        for _ in range(STEADY_BATCHES):
            t = time.perf_counter()
            data.next()
            torch.cuda.synchronize()
            wait += time.perf_counter() - t
            time.sleep(step_s)
        waits.append(wait)

    try:
        benchmark.pedantic(run, rounds=5, iterations=1)
    finally:
        data.close()
    wait = min(waits)
    wall = wait + STEADY_BATCHES * step_s
    name = f"data_wait_{backend}_gpu"
    RESULTS[name] = STEADY_BATCHES * STEP_BATCH / wall
    benchmark.extra_info.update(data_wait_frac=round(wait / wall, 4), clips_per_s=round(RESULTS[name], 1),
                                clips_per_s_per_core=round(RESULTS[name] / workers, 1), workers=workers,
                                device=torch.cuda.get_device_name())


def test_targets():
    """The issue's goals: the batched CPU loader >= 3x the per-clip reference of the same run, checked
    on `build_loader(backend="torch", num_workers=TARGET_WORKERS)` in steady state, interleaved with
    the reference (test_target_cpu_loader_interleaved); the GPU fbank >= 2,000 clips/s (checked
    where a GPU ran)."""
    if "target_reference" not in RESULTS or "target_loader" not in RESULTS:
        pytest.skip("run test_target_cpu_loader_interleaved in the same session")
    ratio = RESULTS["target_loader"] / RESULTS["target_reference"]
    assert ratio >= 3.0, f"torch loader, {TARGET_WORKERS} workers, steady state: {ratio:.2f}x the per-clip reference"
    gpu = [v for k, v in RESULTS.items() if k.startswith("fbank_gpu")]
    if gpu:
        assert max(gpu) >= 2000, f"GPU fbank {max(gpu):.0f} clips/s"
