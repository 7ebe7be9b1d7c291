"""The DALI backend of the front end: the loader's files through one DALI graph, on the CPU
(device_id=None) or the GPU (device_id=k; the same graph with GPU operators after decoding).

    file bytes, fed in the loader's rank-sharded per-epoch order (headers checked first)
    -> fn.decoders.audio: libsndfile at the file's own rate, channels averaged (audio.decode's samples)
    -> [GPU graph: to the device]
    -> resampling to 16 kHz and mean subtraction: audio.resample (torchaudio's sinc) in torch,
       run by the graph through fn.dl_tensor_python_function
    -> Kaldi framing (25 ms every 10 ms, snip_edges), per-frame DC removal, in-frame pre-emphasis
       (slices, sums, concatenations, arithmetic), then fn.spectrogram for the symmetric Hann
       window and the 512-point power spectrum of each frame, pad/crop to target_length frames
       (every one of these operators has a GPU kernel)
    -> handed to torch through DLPack without a copy: the 257 -> 128 mel projection, the log and
       the normalisation run there on the same device, and the batch is that result.

What is not a DALI operator, and why: fn.audio_resample is not torchaudio's resampler (0.02-0.3 off
on the golden 16 kHz waves, up to 1.5 on the normalised features), and fn.mel_filter_bank draws its
triangles linear in Hz where Kaldi's are linear in mel (about 1e-2 on the log-mel, five times the
golden tolerance). Every released SSLAM/EAT checkpoint assumes the exact Kaldi features.

Bad input: a file whose header libsndfile rejects (missing, unreadable, foreign, empty, too long,
shorter than one frame) is skipped before it is fed. A decoding error inside DALI ends that
pipeline: the clips it held are decoded again with soundfile, the ones that fail are skipped with
soundfile's reason, the graph is rebuilt and the others are fed again, so nothing is lost and the
order is kept (if soundfile reads them all, they are fed again as float WAV that it decoded).
MP3, which DALI's libsndfile cannot open, is always fed that way. Clips that decode to NaN/Inf
are dropped from the batch after the graph. The loader refills batches from the following clips,
as for the torch backend.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
from collections import deque
from typing import Deque, Iterator, List, Optional, Tuple

import numpy as np
import torch

from . import audio

logger = logging.getLogger(__name__)

Tag = Tuple[int, int, int, int]


def _power_spectrum(wave, n, device: str, target_length: int):
    """DALI subgraph: mean-subtracted 16 kHz clips (on `device`) and their lengths (an integer CPU
    node: shapes cannot come back from the GPU) -> (Kaldi power spectra [target_length, 257],
    frame counts)."""
    from nvidia.dali import fn, math, types

    size, shift, n_fft = audio._frame_geometry(audio.SAMPLE_RATE)
    if size != 2.5 * shift:
        raise AssertionError("the row-splicing below assumes a 400-sample frame every 160 samples")
    window = torch.hann_window(size, periodic=False, dtype=torch.float32).numpy()
    frames_n = (n - size) // shift + 1
    # Pad to (T + 2) rows of 160 samples; frame t is row t, row t+1 and half of row t+2. A clip too
    # short for one frame is framed as one (and reported by its frame count of 0 or less).
    rows_n = fn.cast((math.max(frames_n, 1) + 2) * shift, dtype=types.INT32)
    padded = fn.slice(wave, 0, rows_n, axes=[0], out_of_bounds_policy="pad", fill_values=0.0)
    # Kaldi removes each frame's mean m, then pre-emphasises inside the frame:
    #   y[i] = (x[i] - m) - 0.97 (x[i-1] - m) = z[i] - 0.03 m for i >= 1, z = x[i] - 0.97 x[i-1],
    # and y[0] meets the symmetric Hann window's w[0] = 0. So the frames are cut from z, the
    # pre-emphasis of the whole clip, less 0.03 m; the frame means come from sums of 160- and
    # 80-sample rows.
    rows = fn.reshape(padded, shape=[-1, shift])
    row_sums = fn.reductions.sum(rows, axes=[1])
    half_sums = fn.reductions.sum(rows[:, : size - 2 * shift], axes=[1])
    means = fn.reshape((row_sums[:-2] + row_sums[1:-1] + half_sums[2:]) * (1.0 / size), shape=[-1, 1])
    emphasised = fn.cat(padded[:1] * (1.0 - audio.PREEMPHASIS), padded[1:] - audio.PREEMPHASIS * padded[:-1], axis=0)
    z_rows = fn.reshape(emphasised, shape=[-1, shift])
    frames = fn.cat(z_rows[:-2], z_rows[1:-1], z_rows[2:, : size - 2 * shift], axis=1)
    if window[0] != 0.0:
        raise AssertionError("the pre-emphasis rewrite relies on the window's first weight being 0")
    # fn.power_spectrum has no GPU kernel; fn.spectrogram has, and over the frames laid end to end
    # (400-sample windows every 400 samples) it applies the window and gives each frame's 512-point
    # power spectrum (where it puts the 112 zeros of padding changes only the phase).
    centred = fn.reshape(frames - (1.0 - audio.PREEMPHASIS) * means, shape=[-1])
    power = fn.spectrogram(centred, nfft=n_fft, window_length=size, window_step=size, window_fn=window.tolist(),
                           center_windows=False, power=2, layout="tf")
    power = fn.slice(power, 0, target_length, axes=[0], out_of_bounds_policy="pad", fill_values=0.0)
    return power, frames_n


@functools.lru_cache(maxsize=None)
def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    return torch.cuda.Stream(device)


@contextlib.contextmanager
def _own_stream(device: torch.device):
    """Run the enclosed torch work on a stream of this module's own and wait for it at the end (on
    the CPU: just run it). Waiting for the current stream instead, usually the default one, would
    also wait for every kernel the training step has queued there."""
    if device.type != "cuda":
        yield
        return
    stream = _side_stream(device)
    with torch.cuda.stream(stream):
        yield
    stream.synchronize()


def _log_mel(outputs, device: torch.device, target_length: int, num_mel_bins: int):
    """DALI outputs (power, frame counts) -> (raw log-mel [B, target_length, F] with zeros past each
    clip's frames, frame counts [B]). The DLPack view aliases DALI's buffer: call this inside
    `_own_stream`, which waits for the read before the pipeline may run again."""
    power = torch.from_dlpack(outputs[0].as_tensor())
    n_frames = torch.from_dlpack(outputs[1].as_tensor()).to(device=device, dtype=torch.long).reshape(-1)
    mel = audio.log_mel(audio.mel_project(power, num_mel_bins))
    mel.masked_fill_(torch.arange(target_length, device=device)[None, :, None] >= n_frames[:, None, None], 0.0)
    return mel, n_frames


def _hand_over(tensor: torch.Tensor, consumer) -> torch.Tensor:
    """`tensor` was made on `_own_stream`; the caching allocator must not give its memory back to
    that stream while `consumer` (the stream current where the result is used) may still read it."""
    if tensor.is_cuda:
        tensor.record_stream(consumer)
    return tensor


def spectra_pipeline(max_batch_size: int, device_id: Optional[int], num_threads: int, target_length: int):
    """The spectral half of the graph alone, fed 16 kHz mean-subtracted waveforms as "wave" (traced, not built)."""
    from nvidia.dali import fn, pipeline_def, types

    device = "cpu" if device_id is None else "gpu"

    @pipeline_def(batch_size=max_batch_size, num_threads=num_threads, device_id=device_id,
                  exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
    def spectra():
        wave = fn.external_source(name="wave", dtype=types.FLOAT, ndim=1, device="cpu")
        n = wave.shape(dtype=types.INT64)
        return _power_spectrum(wave.gpu() if device == "gpu" else wave, n, device, target_length)

    return spectra()


class DaliFbank:
    """Callable: list of B mono 16 kHz mean-subtracted waveforms [N_i] -> raw log-mel
    [B, target_length, 128] (zero past each clip's frames), on the pipeline's device. For callers
    that hold waveforms."""

    def __init__(self, max_batch_size: int, device_id: Optional[int] = None, target_length: int = audio.TARGET_LENGTH,
                 num_threads: int = 2, num_mel_bins: int = audio.NUM_MEL_BINS):
        self.target_length = target_length
        self.device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
        self.num_mel_bins = num_mel_bins
        self.pipe = spectra_pipeline(max_batch_size, device_id, num_threads, target_length)
        self.pipe.build()

    def __call__(self, waves: List[torch.Tensor]) -> torch.Tensor:
        self.pipe.feed_input("wave", [w.numpy() if isinstance(w, torch.Tensor) else np.asarray(w, np.float32) for w in waves])
        consumer = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        with _own_stream(self.device):
            mel = _log_mel(self.pipe.run(), self.device, self.target_length, self.num_mel_bins)[0]
        return _hand_over(mel, consumer)


def _resample_to_16k(wave, rate):
    """fn.dl_tensor_python_function body: one decoded clip and its rate -> 16 kHz, mean subtracted."""
    wave = torch.from_dlpack(wave)
    with _own_stream(wave.device):  # DALI has synchronised its stream before the call (synchronize_stream)
        out = audio.resample(wave, int(round(float(torch.from_dlpack(rate)))), audio.SAMPLE_RATE)
        out = out - out.mean() if out.numel() else out.clone()
    return torch.utils.dlpack.to_dlpack(out.contiguous())


def file_pipeline(batch_size: int, device_id: Optional[int], num_threads: int, target_length: int, prefetch: int):
    from nvidia.dali import fn, pipeline_def, types

    device = "cpu" if device_id is None else "gpu"

    # Asynchronous but not pipelined: every schedule_run() runs exactly the batch fed before it, and
    # up to `prefetch` of them are queued while torch consumes earlier outputs.
    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, prefetch_queue_depth=prefetch,
                  exec_async=True, exec_pipelined=False)
    def clips():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1, device="cpu")
        decoded, rate = fn.decoders.audio(encoded, downmix=True, dtype=types.FLOAT)
        # audio.resampled_length, on the CPU: ceil(16000 n / rate), in 64 bits (n may be 1.7e8)
        rate_int = fn.cast(rate, dtype=types.INT64)
        n = (decoded.shape(dtype=types.INT64) * audio.SAMPLE_RATE + rate_int - 1) // rate_int
        if device == "gpu":
            decoded, rate = decoded.gpu(), rate.gpu()
        wave = fn.dl_tensor_python_function(decoded, rate, function=_resample_to_16k, batch_processing=False,
                                            num_outputs=1, device=device, synchronize_stream=True)
        return _power_spectrum(wave, n, device, target_length)

    return clips()  # the graph is traced here; pipe.build() then needs the device


# Containers that soundfile reads and DALI's own libsndfile does not (DALI 2.4: "File contains data
# in an unimplemented format" for MP3; WAV in ten encodings, FLAC, Ogg Vorbis and Opus, AIFF, W64
# and CAF decode to soundfile's samples). These are decoded here and fed as float WAV bytes.
NOT_DECODED_BY_DALI = frozenset({"MP3"})


def _as_float_wav(path: str, max_seconds: float) -> np.ndarray:
    """audio.decode's mono samples, as the bytes of a float32 WAV file (which DALI decodes exactly)."""
    import soundfile as sf

    mono, rate = audio.decode(path, max_seconds=max_seconds)
    buffer = io.BytesIO()
    sf.write(buffer, mono, rate, format="WAV", subtype="FLOAT")
    return np.frombuffer(buffer.getbuffer(), dtype=np.uint8)


class _Entry:
    """One manifest entry on its way through the graph: its tag, its bytes (None once rejected) and
    the reason it was rejected."""

    __slots__ = ("tag", "path", "data", "reason", "as_wav")

    def __init__(self, tag: Tag, path: str, data: Optional[np.ndarray], reason: Optional[str], as_wav: bool = False):
        self.tag, self.path, self.data, self.reason, self.as_wav = tag, path, data, reason, as_wav

    def reject(self, reason: str) -> None:
        self.data, self.reason = None, reason


class DaliClipReader:
    """Drives the file graph for an AudioLoader: `items(tags)` turns loader tags (epoch, position,
    index, slot) into (tag, normalised features [target_length, 128] or None, reason or None), in
    tag order, with `prefetch` batches in flight."""

    def __init__(self, loader, device_id: Optional[int], num_threads: int, prefetch: int = 2):
        self.loader = loader
        self.device_id = device_id
        self.device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
        self.num_threads = max(1, num_threads)
        self.prefetch = max(1, prefetch)
        self.pipe = None
        self.rebuilds = 0

    def _pipeline(self):
        if self.pipe is None:
            self.pipe = file_pipeline(self.loader.batch_size, self.device_id, self.num_threads, self.loader.target_length, self.prefetch)
            self.pipe.build()
        return self.pipe

    def _screen(self, tag: Tag) -> _Entry:
        path = self.loader.manifest.path(tag[2])
        try:
            as_wav = audio.probe(path, max_seconds=self.loader.max_seconds)[2] in NOT_DECODED_BY_DALI
            data = _as_float_wav(path, self.loader.max_seconds) if as_wav else np.fromfile(path, dtype=np.uint8)
        except audio.AudioError as err:
            return _Entry(tag, path, None, err.reason)
        except OSError as err:
            return _Entry(tag, path, None, f"cannot read: {err}")
        return _Entry(tag, path, data, None, as_wav)

    def items(self, tags: Iterator[Tag]) -> Iterator[Tuple[Tag, Optional[torch.Tensor], Optional[str]]]:
        backlog: Deque[_Entry] = deque()
        in_flight: Deque[List[_Entry]] = deque()
        drained = False

        def next_record() -> List[_Entry]:
            record, good = [], 0
            while good < self.loader.batch_size:
                if not backlog:
                    tag = next(tags, None)
                    if tag is None:
                        break
                    backlog.append(self._screen(tag))
                entry = backlog.popleft()
                record.append(entry)
                good += entry.data is not None
            return record

        def fill() -> None:
            while len(in_flight) < self.prefetch:
                record = next_record()
                if not record:
                    return
                data = [e.data for e in record if e.data is not None]
                in_flight.append(record)
                if data:
                    try:
                        pipe = self._pipeline()
                        pipe.feed_input("encoded", data)
                        pipe.schedule_run()
                    except RuntimeError as err:  # DALI reports decoding errors at outputs(); anything else lands here
                        self._recover(err, in_flight, backlog)

        try:
            fill()
            while in_flight:
                record = in_flight[0]
                good = [e for e in record if e.data is not None]
                if good:
                    try:
                        outputs = self.pipe.outputs()
                    except RuntimeError as err:
                        self._recover(err, in_flight, backlog)
                        fill()
                        continue
                    consumer = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
                    with _own_stream(self.device):
                        mel, n_frames = _log_mel(outputs, self.device, self.loader.target_length, audio.NUM_MEL_BINS)
                        finite = torch.isfinite(mel.sum(dim=(1, 2))).tolist()  # NaN/Inf samples reach every sum
                        features = mel.sub_(self.loader.norm_mean).div_(2.0 * self.loader.norm_std)  # audio.normalise, in place
                        n_frames = n_frames.tolist()
                    features = _hand_over(features, consumer)
                    for entry, row, ok, frames in zip(good, features, finite, n_frames):
                        if frames <= 0:
                            entry.reject(f"{frames} Kaldi frames after decoding, shorter than one 25 ms frame")
                        elif not ok:
                            entry.reject("NaN or Inf samples")
                        else:
                            entry.data = row
                in_flight.popleft()
                fill()
                for entry in record:
                    yield entry.tag, entry.data, entry.reason
            drained = True
        finally:
            if not drained:  # runs still queued inside the pipeline: start clean next time
                self.pipe = None

    def _recover(self, err: RuntimeError, in_flight: Deque[List[_Entry]], backlog: Deque[_Entry]) -> None:
        """The pipeline died on a batch. Drop the files in flight that soundfile cannot decode either;
        if there are none, DALI failed on a file that soundfile reads: feed every file in flight as
        float WAV decoded by soundfile (the samples audio.decode gives). Then rebuild the graph and
        put every entry that was in flight back in front of the backlog, in order."""
        entries = [e for record in in_flight for e in record]
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        message = next((line for line in lines if line.lower().startswith(("error decoding", "failed to"))), lines[0] if lines else repr(err))
        culprits = 0
        for entry in entries:
            if entry.data is None:
                continue
            try:
                audio.decode(io.BytesIO(entry.data), max_seconds=self.loader.max_seconds)
            except audio.AudioError as bad:
                entry.reject(bad.reason)
                culprits += 1
        if culprits:
            logger.warning("DALI stopped (%s); %d file(s) that do not decode dropped, graph rebuilt", message, culprits)
        else:
            pending = [e for e in entries if e.data is not None and not e.as_wav]
            if not pending:
                raise RuntimeError(f"DALI pipeline failed on float WAV of files soundfile decodes: {[e.path for e in entries if e.data is not None]}") from err
            for entry in pending:
                entry.data, entry.as_wav = _as_float_wav(entry.path, self.loader.max_seconds), True
            logger.warning("DALI stopped (%s) on files soundfile decodes; %d file(s) fed again as float WAV", message, len(pending))
        self.pipe = None
        self.rebuilds += 1
        backlog.extendleft(reversed(entries))
        in_flight.clear()
