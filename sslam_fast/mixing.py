"""SSLAM partial mixtures (docs/method.md §7): two unmixed windows, element-wise max with the partner clip."""
from typing import Optional, Tuple

import torch


def draw_mix_windows(generator: Optional[torch.Generator] = None, num_frames: int = 1024, window: int = 240,
                     w1_max: int = 496, w2_max: int = 782, step: int = 16) -> Tuple[int, int]:
    """Two unmixed windows (w1, w2) in frames: w1 a random multiple of ``step`` in [0, w1_max],
    w2 one in [w1 + window, w2_max]. The same windows serve the whole batch.

    The draws are python ints: from a CPU ``generator`` that costs nothing, from a GPU one it is a
    host sync (``SSLAMPretrainer.draw`` takes a CPU ``host_generator`` for them)."""
    if not windows_fit(num_frames, window, w1_max, w2_max):
        raise ValueError(
            f"mixing windows do not fit {num_frames} frames (window {window}, w1_max {w1_max}, w2_max {w2_max})"
        )
    device = generator.device if generator is not None else None
    w1 = step * int(torch.randint(0, w1_max // step + 1, (1,), generator=generator, device=device))
    choices = range(w1 + window, w2_max + 1, step)
    w2 = choices[int(torch.randint(0, len(choices), (1,), generator=generator, device=device))]
    return w1, w2


def windows_fit(num_frames: int, window: int, w1_max: int, w2_max: int) -> bool:
    """Whether ``draw_mix_windows`` can draw for clips of ``num_frames`` frames."""
    return w2_max + window <= num_frames and w1_max + 2 * window <= w2_max + window


def scaled_mix_windows(num_frames: int, step: int = 16) -> Tuple[int, int, int]:
    """(window, w1_max, w2_max) of the released recipe (240, 496, 782 frames of 1024) scaled to
    clips of ``num_frames`` frames, in multiples of ``step``: what a shorter-clip recipe can use."""
    window = max(step, step * round(240 * num_frames / 1024 / step))
    w2_max = num_frames - window
    w1_max = min(step * (496 * num_frames // 1024 // step), w2_max - window)
    return window, w1_max, w2_max


def check_windows(windows: Tuple[int, int], num_frames: int, window: int, step: int) -> Tuple[int, int]:
    w1, w2 = (int(w) for w in windows)
    if w1 % step or w2 % step or w1 < 0 or w2 < w1 + window or w2 + window > num_frames:
        raise ValueError(
            f"mix_windows {windows} invalid: need multiples of {step}, 0 <= w1, w1 + {window} <= w2, "
            f"w2 + {window} <= {num_frames}"
        )
    return w1, w2


def partial_mixture(fbank: torch.Tensor, windows: Tuple[int, int], window: int = 240) -> torch.Tensor:
    """Mixture of clip i with clip i-1 (a roll by one over the batch): the element-wise max of the
    two normalised fbanks, except inside the two windows where the mixture is clip i itself.

    fbank: [B, 1, T, F] -> [B, 1, T, F]; windows: python ints or an int64 [2] tensor on fbank's device.
    """
    partner = torch.roll(fbank, shifts=1, dims=0)
    outside = mixed_frames(fbank.shape[-2], windows, window, fbank.device)
    return torch.where(outside[:, None], torch.maximum(fbank, partner), fbank)


def mixed_frames(num_frames: int, windows: Tuple[int, int], window: int, device=None) -> torch.Tensor:
    """[num_frames] bool, True where the partner is mixed in (outside both windows); ``windows``:
    python ints or an int64 [2] tensor on ``device``."""
    t = torch.arange(num_frames, device=device)
    inside = torch.zeros(num_frames, dtype=torch.bool, device=device)
    for w in windows:
        inside |= (t >= w) & (t < w + window)
    return ~inside


def mixed_rows(num_time_patches: int, windows: Tuple[int, int], window: int, patch_size: int = 16,
               device=None) -> torch.Tensor:
    """[num_time_patches] bool, True for the patch rows that are mixed."""
    return mixed_frames(num_time_patches * patch_size, windows, window, device)[::patch_size]


def mixed_row_index(num_time_patches: int, windows: Tuple[int, int], window: int, patch_size: int = 16,
                    device=None) -> torch.Tensor:
    """int64 [num_time_patches - 2 * window // patch_size]: the mixed patch rows ascending (the
    ``True`` rows of ``mixed_rows``), computed on ``device`` from the python windows: a static
    shape, no bool indexing, no host-to-device copy. ``windows``: python ints, or an int64 [2]
    tensor on ``device`` (what a compiled step takes: new windows need no new graph)."""
    if isinstance(windows, torch.Tensor):
        w = windows // patch_size
        w1, w2 = w.min(), w.max()
    else:
        w1, w2 = sorted(int(w) // patch_size for w in windows)
    width = window // patch_size
    j = torch.arange(num_time_patches - 2 * width, device=device)
    return j + width * (j >= w1) + width * (j >= w2 - width)
