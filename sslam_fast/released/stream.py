"""Long recordings in bounded memory: a file's windows (of the checkpoint's clip length, 1024
frames for the released models), decoded and computed piece by piece.

``stream_windows(path)`` yields the same normalised windows as ``fbank_windows(load_audio(path))``
(``released/hear.py``), a few at a time, holding about ``block_seconds`` of audio plus one window:

- the file is read ``block_seconds`` at a time and channels are averaged;
- a rate other than 16 kHz is resampled block by block with the kernel of ``data.audio.resample``:
  each block is resampled with ``context`` input samples of the file on both sides (zeros beyond
  its ends, as the whole-file resampler pads), a multiple of the rate ratio's period wider than the
  kernel, so its outputs are the whole-file outputs;
- window k needs the 16 kHz samples 163840 k ... 163840 k + 164079 (its 1024 frames of 400
  samples every 160); the last window has the remaining frames, zero-padded in the log-mel domain.

The whole-file path subtracts the clip's mean before the fbank; a stream cannot know it in advance
and does not, which changes nothing but rounding: the Kaldi fbank removes each frame's own mean
(its DC offset) before anything else, and a constant offset cancels there.
"""
import contextlib
import math
from typing import Iterator, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..data.audio import (SAMPLE_RATE, AudioError, check_rate, check_samples, decode_reason, kaldi_fbank, normalise,
                          num_frames, regular_file, resample)
from .formats import InputSettings

HOP = 160  # samples per fbank frame at 16 kHz


def _blocks(path: str, sound_file, block: int) -> Iterator[np.ndarray]:
    """Mono float32 blocks of ``block`` samples (the last shorter) at the file's own rate, each
    checked as ``decode`` checks a whole file (finite, within +-MAX_AMPLITUDE)."""
    while True:
        data = sound_file.read(block, dtype="float32", always_2d=True)
        if data.shape[0] == 0:
            return
        mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
        check_samples(path, mono)
        yield np.ascontiguousarray(mono)


def _resampled(blocks: Iterator[np.ndarray], rate: int, block: int) -> Iterator[torch.Tensor]:
    """16 kHz samples of the stream of ``blocks`` (each ``block`` long but the last, ``block`` a
    multiple of the ratio's period), equal to resampling the whole stream at once."""
    if rate == SAMPLE_RATE:
        yield from (torch.from_numpy(b) for b in blocks)
        return
    g = math.gcd(rate, SAMPLE_RATE)
    orig, new = rate // g, SAMPLE_RATE // g
    width = math.ceil(6 * orig / (min(orig, new) * 0.99))  # the kernel's half width (input samples)
    context = orig * (width // orig + 2)
    pending, total, emitted, done = np.zeros(context, np.float32), 0, 0, False
    while not done or pending.shape[0] > context:
        while not done and pending.shape[0] < 2 * context + block:
            try:
                b = next(blocks)
            except StopIteration:
                done = True
                break
            pending = np.concatenate([pending, b])
            total += b.shape[0]
        span = min(block, pending.shape[0] - context)
        piece = np.pad(pending[: 2 * context + span], (0, max(0, 2 * context + span - pending.shape[0])))
        out = resample(torch.from_numpy(piece), orig, new)
        start = context // orig * new
        stop = -(-(context + span) * new // orig)
        if done and pending.shape[0] - context <= block:  # the stream's last block: stop at its length
            stop = start + -(-total * new // orig) - emitted
        emitted += stop - start
        yield out[start:stop]
        pending = pending[span:]


def stream_windows(path: str, block_seconds: float = 20.0,
                   input: InputSettings = InputSettings()) -> Iterator[Tuple[torch.Tensor, int]]:
    """Yield (normalised windows [k, L, 128], fbank frames they cover) of the file at ``path``, in
    order, about ``block_seconds`` of audio at a time (at least one window); L and the
    normalisation are ``input``'s. Raises AudioError for a file that cannot be decoded, is empty or
    has no 25 ms frame."""
    window_frames = input.target_length
    window_hop = window_frames * HOP  # 16 kHz samples from one window's start to the next
    window_span = (window_frames - 1) * HOP + 400  # 16 kHz samples one window's frames cover

    with contextlib.ExitStack() as opened:
        try:  # a regular file only (a FIFO or device never blocks), its header checked as decode checks it
            sound_file = opened.enter_context(regular_file(path))
        except AudioError:
            raise
        except Exception as err:  # libsndfile reports missing, truncated and foreign files alike
            raise AudioError(path, decode_reason(err)) from err
        rate = check_rate(path, sound_file.samplerate, sound_file.channels)
        period = rate // math.gcd(rate, SAMPLE_RATE)
        block = period * max(1, round(block_seconds * rate / period))
        per_piece = max(1, round(block_seconds * SAMPLE_RATE / window_hop))
        buffer, pieces, frames = torch.zeros(0), [], 0
        try:
            for samples in _resampled(_blocks(path, sound_file, block), rate, block):
                buffer = torch.cat([buffer, samples])
                while buffer.shape[0] >= window_span:
                    pieces.append(kaldi_fbank(buffer[:window_span]))
                    buffer = buffer[window_hop:]
                    if len(pieces) == per_piece:
                        frames += per_piece * window_frames
                        yield normalise(torch.stack(pieces), input.norm_mean, input.norm_std), per_piece * window_frames
                        pieces = []
        except AudioError:
            raise
        except Exception as err:
            raise AudioError(path, decode_reason(err)) from err
        tail = num_frames(buffer.shape[0])
        if tail:
            pieces.append(F.pad(kaldi_fbank(buffer), (0, 0, 0, window_frames - tail)))
        covered = (len(pieces) - 1) * window_frames + tail if tail else len(pieces) * window_frames
        if not pieces and frames == 0:
            raise AudioError(path, f"{buffer.shape[0]} samples at 16 kHz, shorter than one 25 ms frame"
                             if buffer.shape[0] else "no samples")
        if pieces:
            yield normalise(torch.stack(pieces), input.norm_mean, input.norm_std), covered
