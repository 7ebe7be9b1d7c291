"""Audio front end of docs/method.md §2: decode, mono, resample to 16 kHz, Kaldi fbank, pad/crop, normalise.

Everything here is plain PyTorch, batched over clips with per-clip lengths, and runs unchanged on
the CPU and on a GPU. `kaldi_fbank` equals `torchaudio.compliance.kaldi.fbank` with the arguments
SSLAM uses and `resample` equals `torchaudio.functional.resample` with its defaults; both are
checked against arrays that the real torchaudio produced (tests/fixtures/golden/).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import stat
from typing import BinaryIO, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

SAMPLE_RATE = 16000
NUM_MEL_BINS = 128
TARGET_LENGTH = 1024
NORM_MEAN = -4.268  # AudioSet (docs/method.md §2, step 6)
NORM_STD = 4.569
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
PREEMPHASIS = 0.97
LOW_FREQ = 20.0
# The longest clip we agree to decode (samples at the file's own rate): one hour at 48 kHz.
MAX_SAMPLES = 48000 * 3600
# The longest clip the loader, check-data, extract, tag and HEAR accept by default.
MAX_SECONDS = 600.0
# Sample rates a file may declare; outside this range a header is broken or hostile.
MIN_RATE, MAX_RATE = 1000, 384000
# The most channels a file may declare (the samples of all channels are read before the mixdown).
MAX_CHANNELS = 32
# Largest |sample| a float file may hold. Audio is scaled to [-1, 1]; below this bound the fbank
# (power <= (512 * 1e4)^2, the resampler's gain near 1) stays finite in float32.
MAX_AMPLITUDE = 1e4

PathOrFile = Union[str, os.PathLike, BinaryIO]


class AudioError(ValueError):
    """A file that cannot be turned into audio: missing, unreadable, empty, non-finite, too long."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------


def decode(path: PathOrFile, max_samples: int = MAX_SAMPLES, max_seconds: Optional[float] = None) -> Tuple[np.ndarray, int]:
    """Read wav/flac/ogg/mp3 and average channels: returns (float32 [N] mono, sample rate).

    Raises AudioError for a missing, unreadable, empty, non-finite or too long file (more than
    `max_samples` samples, or more than `max_seconds` at the file's own rate when given), for
    anything but a regular file, a sample rate outside MIN_RATE..MAX_RATE and samples beyond
    +-MAX_AMPLITUDE (whose features would overflow to Inf/NaN). The file is opened once; 16-bit
    PCM is read as int16 and scaled by 2**-15 here, which gives exactly libsndfile's float32
    samples at a third of its cost.
    """
    try:
        with regular_file(path) as f:
            rate = check_rate(path, f.samplerate, f.channels)
            _check_limit(path, f.frames, rate, max_samples, max_seconds)
            pcm16 = f.subtype == "PCM_16"
            data = f.read(dtype="int16" if pcm16 else "float32", always_2d=True)
    except AudioError:
        raise
    except Exception as err:  # libsndfile reports missing, truncated and foreign files alike
        raise AudioError(path, decode_reason(err)) from err
    if data.shape[0] == 0:
        raise AudioError(path, "no samples")
    if pcm16:
        data = data.astype(np.float32)
        data *= np.float32(1.0 / 32768.0)
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if not pcm16:
        check_samples(path, mono)
    return np.ascontiguousarray(mono), rate


def check_samples(path, mono: np.ndarray) -> None:
    """AudioError for NaN or Inf samples, or samples beyond +-MAX_AMPLITUDE (float audio whose
    features would overflow)."""
    peak = float(np.abs(mono).max()) if mono.size else 0.0
    if not np.isfinite(peak):
        raise AudioError(path, "NaN or Inf samples")
    if peak > MAX_AMPLITUDE:
        raise AudioError(path, f"samples up to {peak:.3g}, beyond +-{MAX_AMPLITUDE:g}: not audio scaled to [-1, 1]")


@contextlib.contextmanager
def regular_file(source: PathOrFile):
    """An open libsndfile handle of `source`, which must be a regular file when given by path.
    The descriptor is opened without blocking and checked itself: a FIFO or a device named in a
    manifest would otherwise block or stream for ever."""
    import soundfile as sf

    if not isinstance(source, (str, os.PathLike)):
        with sf.SoundFile(source) as f:
            yield f
        return
    try:
        fd = os.open(source, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        raise AudioError(source, f"cannot open: {err.strerror}") from err
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise AudioError(source, "not a regular file")
        with sf.SoundFile(fd, closefd=False) as f:
            yield f
    finally:
        os.close(fd)


def decode_reason(err: Exception) -> str:
    """libsndfile's own message, without the file descriptor or file object it was opened from."""
    return f"cannot decode: {getattr(err, 'error_string', err)}"


def check_rate(path, rate, channels: int) -> int:
    """The header's sample rate, checked with its channel count."""
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(path, f"sample rate {rate} Hz outside the supported {MIN_RATE}-{MAX_RATE} Hz")
    if channels > MAX_CHANNELS:
        raise AudioError(path, f"{channels} channels, more than {MAX_CHANNELS}")
    return int(rate)


def _check_limit(path, frames: int, rate: int, max_samples: int, max_seconds: Optional[float]) -> None:
    limit = max_samples if max_seconds is None else min(max_samples, int(max_seconds * rate))
    if frames > limit:
        raise AudioError(path, f"{frames / rate:.1f} s ({frames} samples at {rate} Hz), longer than the limit of {limit / rate:.1f} s")


def check_length_16k(path, length: int) -> None:
    """Raise AudioError when `length` samples at 16 kHz give no Kaldi frame."""
    if num_frames(length) == 0:
        raise AudioError(path, f"{length} samples at 16 kHz, shorter than one 25 ms frame")


def probe(source: PathOrFile, path=None, max_samples: int = MAX_SAMPLES, max_seconds: Optional[float] = None) -> Tuple[int, int, str]:
    """The checks of `decode` that the header allows, without decoding: returns (frames, sample
    rate, libsndfile's container name such as "WAV", "FLAC", "OGG", "MP3").

    Raises AudioError (naming `path`, default `source`) for a file that libsndfile cannot open, has
    no samples, is over the length limits of `decode`, or is shorter than one frame at 16 kHz.
    Truncated data and NaN/Inf samples only show when decoding.
    """
    path = source if path is None else path
    try:
        with regular_file(source) as f:
            frames, rate, channels, container = f.frames, f.samplerate, f.channels, f.format
    except AudioError as err:
        raise AudioError(path, err.reason) from err
    except Exception as err:
        raise AudioError(path, decode_reason(err)) from err
    rate = check_rate(path, rate, channels)
    if frames <= 0:
        raise AudioError(path, "no samples")
    _check_limit(path, frames, rate, max_samples, max_seconds)
    check_length_16k(path, resampled_length(frames, rate, SAMPLE_RATE))
    return int(frames), rate, str(container)


def load_audio(path: PathOrFile, sample_rate: int = SAMPLE_RATE, max_seconds: Optional[float] = None) -> torch.Tensor:
    """File -> mono float32 waveform [N] at `sample_rate` (channels averaged first, then resampled);
    a file longer than `max_seconds` is an AudioError."""
    mono, rate = decode(path, max_seconds=max_seconds)
    return resample(torch.from_numpy(mono), rate, sample_rate)


# ----------------------------------------------------------------------------------------------
# Resampling (torchaudio.functional.resample, method "sinc_interp_hann", width 6, rolloff 0.99)
# ----------------------------------------------------------------------------------------------


# The polyphase kernels hold about new * orig taps for the reduced ratio orig / new (a 16,001 Hz file
# has orig = 16001, new = 16000): above this many taps a rate is resampled by `_resample_direct`.
MAX_KERNEL_TAPS = 1 << 20


def _kernel_taps(orig: int, new: int, width_taps: int, rolloff: float) -> int:
    return new * (2 * math.ceil(width_taps * orig / (min(orig, new) * rolloff)) + orig)


@functools.lru_cache(maxsize=16)
def _sinc_kernel(orig: int, new: int, width_taps: int, rolloff: float, device: str, dtype: torch.dtype):
    """Polyphase Hann-windowed sinc kernel [new, 1, 2*width + orig], built in the waveform's dtype as
    torchaudio builds it, so that even its rounding matches."""
    base = min(orig, new) * rolloff
    width = math.ceil(width_taps * orig / base)
    idx = torch.arange(-width, width + orig, dtype=dtype, device=device)[None, None] / orig
    t = torch.arange(0, -new, -1, dtype=dtype, device=device)[:, None, None] / new + idx
    t *= base
    t = t.clamp_(-width_taps, width_taps)
    window = torch.cos(t * math.pi / width_taps / 2) ** 2
    t *= math.pi
    kernel = torch.where(t == 0, torch.tensor(1.0).to(t), t.sin() / t)
    kernel *= window * (base / orig)
    return kernel, width


@functools.lru_cache(maxsize=16)
def _block_kernel(orig: int, new: int, width_taps: int, rolloff: float, dtype: torch.dtype):
    """The polyphase kernel as one banded matrix [R, P * new] for the CPU: a row of R input samples
    (starting at a multiple of P * orig) times it gives P consecutive output blocks of `new` samples.
    Column j * new + p holds phase p's taps at rows j * orig ..; the rest are exact zeros, which
    add nothing, so the sums are the convolution's own. P = 2 * ceil(K / orig) keeps the zeros to
    about 2/3 of the matrix, and the product runs as one float32 GEMM (3-4x faster on the CPU
    than oneDNN's conv1d with one input channel)."""
    kernel, width = _sinc_kernel(orig, new, width_taps, rolloff, "cpu", dtype)
    taps = kernel.shape[-1]
    blocks = 2 * -(-taps // orig)
    rows = (blocks - 1) * orig + taps
    matrix = torch.zeros(rows, blocks, new, dtype=dtype)
    for j in range(blocks):
        matrix[j * orig : j * orig + taps, j, :] = kernel[:, 0, :].t()
    return matrix.reshape(rows, blocks * new), blocks, width


def _use_block_kernel(waveform: torch.Tensor, orig: int, new: int, width_taps: int, rolloff: float) -> bool:
    """The banded GEMM pays where the kernel spans several strides (32/48/24/8 kHz -> 16 kHz); for
    44.1 or 22.05 kHz (orig = 441) the convolution is already one GEMM per block."""
    if waveform.is_cuda:
        return False
    base = min(orig, new) * rolloff
    taps = 2 * math.ceil(width_taps * orig / base) + orig
    return taps >= 4 * orig


def _conv1d_fp32(x: torch.Tensor, kernel: torch.Tensor, stride: int) -> torch.Tensor:
    """conv1d in full float32: cuDNN would otherwise take TF32 (10-bit mantissa) on an Ampere+ GPU."""
    if not x.is_cuda:
        return F.conv1d(x, kernel, stride=stride)
    cudnn = torch.backends.cudnn
    with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic, allow_tf32=False):
        return F.conv1d(x, kernel, stride=stride)


def _resample_direct(flat: torch.Tensor, orig: int, new: int, width_taps: int, rolloff: float, n_out: int) -> torch.Tensor:
    """The same windowed sinc as `_sinc_kernel`, with each output's taps placed at its own input
    position instead of tabulated per block of `orig` inputs: output k sits at input sample
    k * orig / new, i.e. after sample floor(k * orig / new) by the fraction (k * orig mod new) / new,
    and takes the 2 * width + 2 samples around it, weighted by the row of `_phase_table` of that
    fraction. Memory is the table (new x taps, at most ~22 MB for rates of 1-384 kHz) and chunks
    of 2^19 products; time grows with outputs x taps, never with the reduced ratio's numerator.
    Equal to the polyphase path up to float rounding."""
    width = math.ceil(width_taps * orig / (min(orig, new) * rolloff))
    table = _phase_table(orig, new, width_taps, rolloff, width, flat.dtype, flat.device)
    columns = torch.arange(table.shape[1], device=flat.device)
    padded = F.pad(flat, (width, width + 2))
    out = flat.new_empty(flat.shape[0], n_out)
    step = max(1, (1 << 19) // (table.shape[1] * flat.shape[0]))  # few, large ops: each OpenMP region costs on a busy CPU
    for start in range(0, n_out, step):
        k = torch.arange(start, min(start + step, n_out), dtype=torch.int64, device=flat.device) * orig
        first = torch.div(k, new, rounding_mode="floor")
        out[:, start : start + len(k)] = (padded[:, first[:, None] + columns] * table[k % new]).sum(-1)
    return out


def _phase_table(orig: int, new: int, width_taps: int, rolloff: float, width: int, dtype: torch.dtype, device) -> torch.Tensor:
    """[new, 2 * width + 2]: row r holds the Hann-windowed sinc taps of an output that lies r / new
    of a sample after its first tap's anchor; computed in float64, in chunks of rows."""
    base = min(orig, new) * rolloff
    offsets = torch.arange(-width, width + 2, dtype=torch.float64, device=device)
    table = torch.empty(new, len(offsets), dtype=dtype, device=device)
    step = max(1, (1 << 18) // len(offsets))
    for start in range(0, new, step):
        fraction = torch.arange(start, min(start + step, new), dtype=torch.float64, device=device) / new
        t = ((offsets[None] - fraction[:, None]) * (base / orig)).clamp_(-width_taps, width_taps)
        window = torch.cos(t * (math.pi / width_taps / 2)) ** 2
        t *= math.pi
        table[start : start + len(fraction)] = torch.where(t == 0, torch.ones_like(t), t.sin() / t) * window * (base / orig)
    return table


def resampled_length(length: int, orig_freq: int, new_freq: int) -> int:
    """Samples after resampling `length` samples from orig_freq to new_freq (ceil, as torchaudio)."""
    g = math.gcd(int(orig_freq), int(new_freq))
    orig, new = int(orig_freq) // g, int(new_freq) // g
    return -(-new * int(length) // orig)


def resample(
    waveform: torch.Tensor,
    orig_freq: int,
    new_freq: int = SAMPLE_RATE,
    lowpass_filter_width: int = 6,
    rolloff: float = 0.99,
) -> torch.Tensor:
    """Band-limited resampling of [..., N] (float) from orig_freq to new_freq, equal to
    torchaudio.functional.resample with the same arguments (up to float rounding for the ratios
    that `_resample_direct` takes). Returns [..., ceil(N * new / orig)].

    Zero padding at the end of a clip inside a batch does not change that clip's first
    `resampled_length(len, orig, new)` outputs, so padded batches of one source rate can be resampled
    together and each row cut to its own length.
    """
    if int(orig_freq) != orig_freq or int(new_freq) != new_freq or orig_freq <= 0 or new_freq <= 0:
        raise ValueError(f"sample rates must be positive integers, got {orig_freq} -> {new_freq}")
    if orig_freq == new_freq:
        return waveform
    g = math.gcd(int(orig_freq), int(new_freq))
    orig, new = int(orig_freq) // g, int(new_freq) // g
    shape = waveform.shape
    flat = waveform.reshape(-1, shape[-1])
    n_out = resampled_length(shape[-1], orig, new)
    if _kernel_taps(orig, new, lowpass_filter_width, rolloff) > MAX_KERNEL_TAPS:
        out = _resample_direct(flat, orig, new, lowpass_filter_width, rolloff, n_out)
    elif _use_block_kernel(waveform, orig, new, lowpass_filter_width, rolloff):
        matrix, blocks, width = _block_kernel(orig, new, lowpass_filter_width, rolloff, waveform.dtype)
        rows = max(1, -(-n_out // (blocks * new)))  # output rows of `blocks` blocks each
        length = (rows - 1) * blocks * orig + matrix.shape[0]
        padded = F.pad(flat, (width, length - width - shape[-1]))
        windows = padded.unfold(1, matrix.shape[0], blocks * orig).reshape(-1, matrix.shape[0])  # one copy, then a 2-D GEMM
        out = torch.mm(windows, matrix).reshape(flat.shape[0], -1)
    else:
        kernel, width = _sinc_kernel(orig, new, lowpass_filter_width, rolloff, str(waveform.device), waveform.dtype)
        padded = F.pad(flat, (width, width + orig))
        out = _conv1d_fp32(padded[:, None], kernel, orig)  # [B, new, n_blocks]: one row per phase
        out = out.transpose(1, 2).reshape(flat.shape[0], -1)
    out = out[:, :n_out]
    return out.reshape(*shape[:-1], out.shape[-1])


# ----------------------------------------------------------------------------------------------
# Kaldi fbank (torchaudio.compliance.kaldi.fbank with SSLAM's arguments)
# ----------------------------------------------------------------------------------------------


def _frame_geometry(sample_rate: int) -> Tuple[int, int, int]:
    size = int(sample_rate * FRAME_LENGTH_MS / 1000)
    shift = int(sample_rate * FRAME_SHIFT_MS / 1000)
    return size, shift, 1 << (size - 1).bit_length()


def num_frames(length: Union[int, torch.Tensor], sample_rate: int = SAMPLE_RATE):
    """Kaldi frames (snip_edges) of a clip of `length` samples: 1 + (length - 400) // 160, 0 if short."""
    size, shift, _ = _frame_geometry(sample_rate)
    if isinstance(length, torch.Tensor):
        return torch.where(length >= size, 1 + torch.div(length - size, shift, rounding_mode="floor"), 0)
    return 1 + (length - size) // shift if length >= size else 0


def _mel_scale(freq):
    return 1127.0 * (1.0 + freq / 700.0).log()


@functools.lru_cache(maxsize=16)
def _mel_banks(num_bins: int, sample_rate: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    """Triangular HTK-mel filters, [n_fft // 2 + 1, num_bins], triangles linear in mel (Kaldi's)."""
    _, _, n_fft = _frame_geometry(sample_rate)
    nyquist = 0.5 * sample_rate
    mel_low = 1127.0 * math.log(1.0 + LOW_FREQ / 700.0)
    mel_high = 1127.0 * math.log(1.0 + nyquist / 700.0)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins).unsqueeze(1)
    left = mel_low + b * delta
    center = mel_low + (b + 1.0) * delta
    right = mel_low + (b + 2.0) * delta
    mel = _mel_scale((sample_rate / n_fft) * torch.arange(n_fft // 2)).unsqueeze(0)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.clamp(torch.min(up, down), min=0.0)
    banks = F.pad(banks, (0, 1))  # the Nyquist bin gets no weight
    return banks.t().contiguous().to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=16)
def _mel_bank_blocks(num_bins: int, sample_rate: int, device: str, dtype: torch.dtype):
    """The filters in groups of 16 with the FFT-bin range each group touches: [(lo, hi, block
    [hi - lo, 16])]. The matrix is 98% zeros, and on the CPU these small products are 6x faster
    than the one dense product."""
    banks = _mel_banks(num_bins, sample_rate, device, dtype)
    used = banks != 0
    blocks = []
    for j in range(0, num_bins, 16):
        rows = used[:, j : j + 16].any(dim=1).nonzero()[:, 0]
        lo, hi = (int(rows.min()), int(rows.max()) + 1) if len(rows) else (0, 1)
        blocks.append((lo, hi, banks[lo:hi, j : j + 16].contiguous()))
    return blocks


def mel_project(power: torch.Tensor, num_mel_bins: int = NUM_MEL_BINS, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Power spectra [..., n_fft/2 + 1] -> Kaldi mel energies [..., num_mel_bins] (not yet logged)."""
    device, dtype = str(power.device), power.dtype
    if power.is_cuda:
        return torch.matmul(power, _mel_banks(num_mel_bins, sample_rate, device, dtype))
    return torch.cat([torch.matmul(power[..., lo:hi], block) for lo, hi, block in _mel_bank_blocks(num_mel_bins, sample_rate, device, dtype)], dim=-1)


def log_mel(mel: torch.Tensor) -> torch.Tensor:
    """Natural log with Kaldi's floor at float32 epsilon (in place)."""
    return mel.clamp_min_(torch.finfo(torch.float32).eps).log_()


@functools.lru_cache(maxsize=16)
def _window(size: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    """Kaldi's 'hanning' window: the symmetric Hann window."""
    return torch.hann_window(size, periodic=False, device=device, dtype=dtype)


def _log_mel(batch: torch.Tensor, sample_rate: int, num_mel_bins: int) -> torch.Tensor:
    """Kaldi log-mel of every full frame of [B, N] -> [B, T, num_mel_bins].

    Kaldi takes each frame x, removes its mean m, pre-emphasises inside the frame (the first sample
    against itself), windows and FFTs. The symmetric Hann window is 0 at the first sample, so the
    windowed frame equals window * (g - 0.03 m) with g = x[n] - 0.97 x[n-1] taken once over the
    whole signal: two elementwise passes over the [T, 400] frames instead of five.
    """
    size, shift, n_fft = _frame_geometry(sample_rate)
    window = _window(size, str(batch.device), batch.dtype)
    n_frames = num_frames(batch.shape[1], sample_rate)
    emphasised = torch.cat([batch[:, :1] * (1.0 - PREEMPHASIS), batch[:, 1:] - PREEMPHASIS * batch[:, :-1]], dim=1)
    dc = (1.0 - PREEMPHASIS) * _frame_means(batch, n_frames, size, shift)
    frames = (emphasised.unfold(1, size, shift) - dc[..., None]) * window
    spectrum = torch.view_as_real(torch.fft.rfft(frames, n=n_fft))
    power = torch.addcmul(spectrum[..., 0].square(), spectrum[..., 1], spectrum[..., 1])
    return log_mel(mel_project(power, num_mel_bins, sample_rate))


@functools.lru_cache(maxsize=16)
def _interleaved_mel_bank_blocks(num_bins: int, sample_rate: int, dtype: torch.dtype):
    """_mel_bank_blocks with every FFT-bin row doubled: the blocks of a projection that takes the
    squared (re, im) pairs of view_as_real(spectrum) and adds the pair inside the GEMM."""
    return [(2 * lo, 2 * hi, block.repeat_interleave(2, dim=0).contiguous()) for lo, hi, block in _mel_bank_blocks(num_bins, sample_rate, "cpu", dtype)]


def _log_mel_cpu(batch: torch.Tensor, sample_rate: int, num_mel_bins: int) -> torch.Tensor:
    """_log_mel for the CPU, the same float32 operations up to the order of two additions, with
    fewer passes and temporaries (1.3-1.5x faster): pre-emphasis written in place, frames written
    straight into the zero-padded FFT input (rfft then pads nothing), the spectrum squared in place
    and re^2 + im^2 summed by the mel GEMM."""
    size, shift, n_fft = _frame_geometry(sample_rate)
    window = _window(size, "cpu", batch.dtype)
    n_frames = num_frames(batch.shape[1], sample_rate)
    emphasised = torch.empty_like(batch)
    torch.mul(batch[:, :1], 1.0 - PREEMPHASIS, out=emphasised[:, :1])
    torch.mul(batch[:, :-1], PREEMPHASIS, out=emphasised[:, 1:])
    torch.sub(batch[:, 1:], emphasised[:, 1:], out=emphasised[:, 1:])
    dc = (1.0 - PREEMPHASIS) * _frame_means(batch, n_frames, size, shift)
    frames = batch.new_empty(batch.shape[0], n_frames, n_fft)
    frames[..., size:].zero_()
    torch.sub(emphasised.unfold(1, size, shift), dc[..., None], out=frames[..., :size]).mul_(window)
    squares = torch.view_as_real(torch.fft.rfft(frames)).square_().flatten(-2)  # re^2, im^2 interleaved
    blocks = _interleaved_mel_bank_blocks(num_mel_bins, sample_rate, batch.dtype)
    return log_mel(torch.cat([torch.matmul(squares[..., lo:hi], block) for lo, hi, block in blocks], dim=-1))


def _frame_means(batch: torch.Tensor, n_frames: int, size: int, shift: int) -> torch.Tensor:
    """Mean of each frame, [B, T]. With 400-sample frames every 160 samples, a frame is five 80-sample
    blocks; summing blocks first avoids a slow reduction over the overlapping frames view."""
    block = math.gcd(size, shift)
    per_frame, step = size // block, shift // block
    used = (n_frames - 1) * shift + size
    sums = batch[:, :used].reshape(batch.shape[0], -1, block).sum(dim=2)
    return sums.unfold(1, per_frame, step).sum(dim=2) / size


def kaldi_fbank(
    waveform: torch.Tensor,
    sample_rate: int = SAMPLE_RATE,
    num_mel_bins: int = NUM_MEL_BINS,
    lengths: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Log-mel filter bank of docs/method.md §2.4, equal to
    torchaudio.compliance.kaldi.fbank(w[None], htk_compat=True, sample_frequency=sample_rate,
    use_energy=False, window_type='hanning', num_mel_bins=num_mel_bins, dither=0.0, frame_shift=10).

    waveform: float [N] (one clip) or [B, N] (a zero-padded batch; `lengths` [B] gives each clip's
    own sample count, default all N). Returns float [T, num_mel_bins] or [B, T_max, num_mel_bins],
    T = num_frames(N); a clip's frames past its own count are 0.0 (the value step 5 pads with).
    """
    single = waveform.dim() == 1
    batch = waveform[None] if single else waveform
    if batch.dim() != 2:
        raise ValueError(f"waveform must be [N] or [B, N], got shape {tuple(waveform.shape)}")
    if not batch.is_floating_point():
        raise TypeError(f"waveform must be floating point, got {batch.dtype}")
    n_frames = num_frames(batch.shape[1], sample_rate)
    if n_frames == 0:
        out = batch.new_zeros(batch.shape[0], 0, num_mel_bins)
        return out[0] if single else out
    # On the CPU, about one 10 s clip at a time keeps the intermediates in cache (several times
    # faster than one big batch); a GPU wants the whole batch at once.
    if batch.is_cuda:
        out = _log_mel(batch, sample_rate, num_mel_bins)
    else:
        step = max(1, 1024 // n_frames)
        chunks = [_log_mel_cpu(batch[i : i + step], sample_rate, num_mel_bins) for i in range(0, batch.shape[0], step)]
        out = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
    if lengths is not None and not single:
        own = num_frames(lengths.to(device=batch.device, dtype=torch.long), sample_rate)
        valid = torch.arange(n_frames, device=batch.device)[None, :] < own[:, None]
        out = out * valid[..., None]
    return out[0] if single else out


# ----------------------------------------------------------------------------------------------
# Features: the model input
# ----------------------------------------------------------------------------------------------


def pad_or_crop(fbank: torch.Tensor, target_length: int = TARGET_LENGTH) -> torch.Tensor:
    """Zero-pad (log-mel domain) or crop at the end along the frame axis (-2) to target_length."""
    n = fbank.shape[-2]
    if n >= target_length:
        return fbank[..., :target_length, :]
    return F.pad(fbank, (0, 0, 0, target_length - n))


def normalise(fbank: torch.Tensor, norm_mean: float = NORM_MEAN, norm_std: float = NORM_STD) -> torch.Tensor:
    """(x - mean) / (2 * std), docs/method.md §2.6."""
    return (fbank - norm_mean) / (2.0 * norm_std)


def subtract_mean(waveform: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Subtract each clip's own mean (over its own samples; zero padding stays zero)."""
    if waveform.dim() == 1 or lengths is None:
        return waveform - waveform.mean(dim=-1, keepdim=True)
    lengths = lengths.to(device=waveform.device)
    mean = waveform.sum(dim=1, keepdim=True) / lengths.clamp_min(1)[:, None].to(waveform.dtype)
    valid = torch.arange(waveform.shape[1], device=waveform.device)[None, :] < lengths[:, None]
    return (waveform - mean) * valid


def fbank_features(
    waveform: torch.Tensor,
    sample_rate: int = SAMPLE_RATE,
    lengths: Optional[torch.Tensor] = None,
    target_length: int = TARGET_LENGTH,
    norm_mean: float = NORM_MEAN,
    norm_std: float = NORM_STD,
    num_mel_bins: int = NUM_MEL_BINS,
) -> torch.Tensor:
    """Mono waveform(s) at `sample_rate` -> normalised model input (docs/method.md §2, steps 2-6).

    waveform: float [N] or zero-padded [B, N] with `lengths` [B]. Returns [target_length, F] or
    [B, target_length, F]. Resamples to 16 kHz first when sample_rate differs.
    """
    if sample_rate != SAMPLE_RATE:
        waveform = resample(waveform, sample_rate, SAMPLE_RATE)
        if lengths is not None:
            lengths = torch.tensor([resampled_length(int(x), sample_rate, SAMPLE_RATE) for x in lengths])
    waveform = subtract_mean(waveform, lengths)
    fbank = kaldi_fbank(waveform, SAMPLE_RATE, num_mel_bins, lengths)
    return normalise(pad_or_crop(fbank, target_length), norm_mean, norm_std)


def load_features(
    path: PathOrFile,
    target_length: int = TARGET_LENGTH,
    norm_mean: float = NORM_MEAN,
    norm_std: float = NORM_STD,
) -> torch.Tensor:
    """File -> normalised fbank [target_length, 128] in one call (decode, mono, resample, fbank...)."""
    return fbank_features(load_audio(path), SAMPLE_RATE, target_length=target_length, norm_mean=norm_mean, norm_std=norm_std)
