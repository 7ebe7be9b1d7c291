"""Small shared builders for the model tests."""
import sys
import types

import torch

from sslam_fast import SSLAMConfig, SSLAMPretrainer


def tiny_config(**overrides) -> SSLAMConfig:
    values = dict(embed_dim=32, depth=3, num_heads=4, average_top_k_layers=3, clone_batch=2,
                  decoder_layers=2, decoder_groups=16)
    values.update(overrides)
    return SSLAMConfig(**values)


def tiny_model(seed: int = 0, **overrides) -> SSLAMPretrainer:
    torch.manual_seed(seed)
    model = SSLAMPretrainer(tiny_config(**overrides))
    # Make the teacher differ from the student so that mix-ups show.
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def fbank_batch(batch: int, frames: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, frames, 128, generator=g) * 0.5


def write_float_wav(path, samples, sample_rate: int) -> None:
    """A 32-bit float WAV (IEEE float, fmt + fact + data chunks) of samples [N] or [N, channels],
    written with the standard library alone, so tests that need a file do not need soundfile."""
    import struct

    import numpy as np

    data = np.asarray(samples, dtype="<f4")
    frames = data.reshape(data.shape[0], -1)
    channels = frames.shape[1]
    payload = frames.tobytes()
    fmt = struct.pack("<HHIIHHH", 3, channels, sample_rate, sample_rate * 4 * channels, 4 * channels, 32, 0)
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt
    chunks += b"fact" + struct.pack("<II", 4, frames.shape[0])
    chunks += b"data" + struct.pack("<I", len(payload)) + payload
    with open(path, "wb") as f:
        f.write(b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks)


def save_with_classes_of(obj, path, module: str, **classes) -> None:
    """torch.save ``obj`` with ``classes`` pickled as members of ``module`` (made up for the save,
    with its parent packages): how a checkpoint of a package that is not installed here looks."""
    parts = module.split(".")
    names = [".".join(parts[:i + 1]) for i in range(len(parts))]
    stubs = {name: types.ModuleType(name) for name in names}
    for name, cls in classes.items():
        setattr(stubs[module], name, cls)
    sys.modules.update(stubs)
    try:
        torch.save(obj, path)
    finally:
        for name in names:
            del sys.modules[name]


class Payload:
    """Pickles as a call of ``function(*args)``: what a malicious checkpoint carries."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args
