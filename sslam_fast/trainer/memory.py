"""The memory a pretraining run needs, estimated from its config before the model is built, so a
run that will not fit says so instead of being killed without a word.

Per process: the weights and optimizer state (student + decoder: fp32 weights, gradients and the
two Adam moments, 16 bytes per parameter, plus fp32 masters with bf16; the fp32 teacher), the
activations the backward pass keeps (the student's blocks on the visible patches of every view, the
decoder on every patch of every view, the teacher's layer outputs for the targets) and the Python
process with torch and DeepSpeed. Calibrated on the 2-core development CPU (peak resident memory of
configs/small.json: 1.16 GB measured, 1.10 estimated; small_sslam.json: 1.60 / 1.59 GB): an
estimate to plan with, not a bound.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..config import SSLAMConfig
from .config import TrainConfig

PROCESS_BYTES = 0.5e9  # python, torch, DeepSpeed and the loader's buffers
BLOCK_SAVED = 16  # values per token and channel one transformer block keeps for its backward
DECODER_SAVED = 6  # per patch, channel and decoder layer (convolution, norm, activation)


@dataclass
class MemoryEstimate:
    state: float  # bytes: weights, gradients, optimizer moments, masters, teacher
    activations: float
    process: float = PROCESS_BYTES

    @property
    def total(self) -> float:
        return self.state + self.activations + self.process

    def describe(self) -> str:
        gb = 1e9
        return (f"{self.total / gb:.1f} GB (weights and optimizer {self.state / gb:.2f}, activations "
                f"{self.activations / gb:.2f}, process {self.process / gb:.1f})")


def parameter_counts(model: SSLAMConfig):
    """(student encoder, decoder) parameter counts, from a model built on the meta device (no memory)."""
    from ..pretrainer import SSLAMPretrainer

    with torch.device("meta"):
        meta = SSLAMPretrainer(model)
    return sum(p.numel() for p in meta.student.parameters()), sum(p.numel() for p in meta.decoder.parameters())


def estimate(cfg: TrainConfig, micro_batch: int) -> MemoryEstimate:
    """The estimate for one process running micro batches of ``micro_batch`` clips."""
    m = cfg.model
    encoder, decoder = parameter_counts(m)
    half = cfg.train.dtype in ("bf16", "fp16")
    state = (encoder + decoder) * (16 + (4 if half else 0)) + encoder * 4
    inputs = micro_batch * (2 if m.stage == 2 else 1)  # stage 2 adds a mixture per clip
    views = inputs * m.clone_batch
    patches = cfg.data.target_length // m.patch_size * m.freq_patches
    visible = int((1 - m.mask_prob) * patches) + 1  # with the CLS token
    act = 2 if half else 4
    student = views * visible * m.depth * BLOCK_SAVED * m.embed_dim * act
    dec = views * patches * m.embed_dim * m.decoder_layers * DECODER_SAVED * act
    teacher = inputs * patches * m.embed_dim * m.average_top_k_layers * 4
    return MemoryEstimate(float(state), float(student + dec + teacher))


def available_bytes(device: torch.device) -> Optional[float]:
    """Free memory where the step runs: the GPU's, or the host's available memory; None if unknown."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_message(cfg: TrainConfig, micro_batch: int, processes_here: int,
                   available: Optional[float]) -> Tuple[str, bool]:
    """(one line: the estimate, and, when ``processes_here`` processes of it exceed ``available``,
    that it will not fit and which settings shrink it; whether it fits)."""
    e = estimate(cfg, micro_batch)
    need = e.total * processes_here
    text = f"memory estimate per process: {e.describe()}"
    if available is None:
        return text, True
    text += f"; {available / 1e9:.1f} GB available"
    if need > available:
        text += (f": WILL NOT FIT ({need / 1e9:.1f} GB for {processes_here} process(es)); lower "
                 f"train.max_micro_batch (now {micro_batch}; gradient accumulation keeps the global batch), "
                 f"model.clone_batch or data.target_length, or use a smaller model (configs/small.json)")
    return text, need <= available
