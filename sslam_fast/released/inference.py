"""The inference path: how ``extract``, ``tag`` and the HEAR API run a released model on a CPU.

Paths (``precision``):

- ``"fp32"``: the model as loaded, in fp32; on an x86 CPU its Linear layers run as oneDNN matrix
  products (``sslam_fast.cpu_gemm``, the fused implementation's), not through the BLAS library
  torch's ``F.linear`` calls (MKL in the x86 wheels, whose fp32 GEMM runs at half oneDNN's speed
  on AMD CPUs with AVX-512; benchmarks/RESULTS.md); the outputs differ from ``F.linear``'s by
  summation order only;
- ``"bf16"``: the encoder's weights and activations in bfloat16, its output cast to fp32 (pooling,
  a classifier's head and sigmoid stay in fp32, so probabilities keep fp32 resolution). Fast only where the
  CPU computes bf16 matrix products natively (AVX512-BF16, or AMX-BF16 on recent Xeons); elsewhere
  oneDNN emulates them and bf16 is slower than fp32;
- ``"int8"``: dynamic int8 quantisation of the transformer blocks' Linear layers (weights int8,
  activations quantised per batch), the rest in fp32; an option for CPUs without native bf16;
- ``"auto"`` (the default): ``"bf16"`` on a CPU with native bf16, detected at run time from the
  CPU flags (``/proc/cpuinfo``) and oneDNN, else ``"fp32"``; on CUDA ``"fp32"``. An automatic
  bf16 choice is verified on the first window the model encodes: when the cosine similarity of its
  bf16 output to the fp32 output is below ``COSINE_BOUND`` (per window, for the CLS token and for
  the whole output) the model falls back to fp32 for the rest of the run and says why. The check
  costs one fp32 pass of one window per loaded model. An explicitly chosen path is not verified.
"""
import copy
import dataclasses
import functools
import logging
import types
import warnings
from dataclasses import dataclass
from typing import FrozenSet, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import cpu_gemm
from ..attention import attention
from ..model import Attention, Block, Encoder, Mlp

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "int8")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # native bf16 matrix products (AMX first: the faster one)
COSINE_BOUND = 0.999


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: FrozenSet[str]

    @property
    def bf16_flag(self) -> Optional[str]:
        """The first of ``BF16_FLAGS`` this CPU has, or None."""
        return next((flag for flag in BF16_FLAGS if flag in self.flags), None)


def read_cpu_info(path: str = "/proc/cpuinfo") -> CpuInfo:
    """The CPU's model name and flags from ``/proc/cpuinfo`` (its first processor); empty where
    the file does not exist (not Linux)."""
    model, flags = "unknown CPU", frozenset()
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = frozenset(value.split())
                if not line.strip() and flags:
                    break
    except OSError:
        pass
    return CpuInfo(model, flags)


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    return read_cpu_info()


def native_bf16(info: Optional[CpuInfo] = None) -> bool:
    """True where bf16 matrix products run natively: a bf16 flag and oneDNN in this torch."""
    info = info or cpu_info()
    return info.bf16_flag is not None and torch.backends.mkldnn.is_available()


@dataclass(frozen=True)
class InferencePath:
    """The path a model runs on: precision ("fp32", "bf16", "int8"), device, and why."""

    precision: str
    device: str
    reason: str
    verify: bool = False  # an automatic bf16 choice, checked against fp32 on the first window

    def describe(self) -> str:
        threads = f", {torch.get_num_threads()} threads" if self.device == "cpu" else ""
        return f"inference: {self.precision} on {self.device}{threads} ({self.reason})"


def choose_path(device: str = "cpu", precision: str = "auto", info: Optional[CpuInfo] = None) -> InferencePath:
    """The path for ``precision`` on ``device`` (see the module docstring)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device).type
    if device != "cpu":
        if precision == "int8":
            raise ValueError("int8 dynamic quantisation runs on the CPU only; use --device cpu or another precision")
        if precision == "auto":
            return InferencePath("fp32", device, "the model as loaded; the bf16 / int8 paths are for CPUs")
        return InferencePath(precision, device, "chosen")
    info = info or cpu_info()
    flag = info.bf16_flag if native_bf16(info) else None
    if precision == "auto":
        if flag:
            return InferencePath("bf16", device, f"{info.model} has {flag}; verified against fp32 on the first window; "
                                                 "--fp32 forces fp32", verify=True)
        return InferencePath("fp32", device, f"{info.model} has no native bf16 (AVX512-BF16 / AMX); {_fp32_matmuls()}")
    if precision == "bf16" and not flag:
        return InferencePath("bf16", device, f"chosen; {info.model} has no native bf16, so oneDNN emulates it (slow)")
    if precision == "fp32":
        return InferencePath("fp32", device, f"chosen; {_fp32_matmuls()}")
    return InferencePath(precision, device, f"chosen; {info.model}" + (f" has {flag}" if flag else ""))


def _fp32_matmuls() -> str:
    return "oneDNN fp32 matmuls" if cpu_gemm.available() else "torch's own fp32 matmuls (oneDNN's: x86 torch builds with oneDNN)"


def _attend_by_modules(self: Attention, x: torch.Tensor):
    """``Attention.attend`` calling ``qkv`` as a module, so that a quantised Linear runs it."""
    B, N, C = x.shape
    qkv = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    out = attention(q, k, v, self.ops.attention or self.mode)
    return self.proj(out.transpose(1, 2).reshape(B, N, C)), x


def _transform_by_modules(self: Mlp, x: torch.Tensor):
    """``Mlp.transform`` calling ``fc1`` as a module, so that a quantised Linear runs it."""
    return self.fc2(F.gelu(self.fc1(x))), x


def quantize_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantisation (in place) of the Linear layers of every transformer block of
    ``model``; the blocks' Attention and Mlp are rebound to call those layers as modules (the fused
    ops read ``.weight`` directly, which a quantised Linear does not have)."""
    for block in [m for m in model.modules() if isinstance(m, Block)]:
        with warnings.catch_warnings():  # torch.ao's eager quantisation is deprecated in favour of torchao
            warnings.simplefilter("ignore")
            torch.ao.quantization.quantize_dynamic(block, {nn.Linear}, dtype=torch.qint8, inplace=True)
        block.attn.attend = types.MethodType(_attend_by_modules, block.attn)
        block.mlp.transform = types.MethodType(_transform_by_modules, block.mlp)
    return model


def _float_output(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    return output.float()


def encoders_to_bf16(model: nn.Module) -> nn.Module:
    """Every transformer encoder of ``model`` in bf16 (in place), its output cast back to fp32; the
    encoder casts its fbank input to its weights' dtype itself."""
    for encoder in [m for m in model.modules() if isinstance(m, Encoder)]:
        encoder.to(torch.bfloat16).register_forward_hook(_float_output)
    return model


def cosine_per_window(out: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per window [N] of two outputs [N, ...] (flattened)."""
    return F.cosine_similarity(out.float().flatten(1), reference.float().flatten(1), dim=1)


class InferenceModel(nn.Module):
    """A model (``AudioEncoder``, a classifier, ...) run on an ``InferencePath``: fp32 fbank in,
    fp32 outputs out, whatever the path computes in. ``path`` says which path runs it (after a
    fall back, fp32 and why). Attributes it does not have are the model's (``embed_dim``, ...).
    The bf16 and int8 paths run a converted copy: the model passed in is left as it is."""

    def __init__(self, model: nn.Module, path: InferencePath):
        super().__init__()
        self.path = path
        self.reference = model if path.verify else None  # the fp32 model until the check is done
        if path.precision == "bf16":
            model = encoders_to_bf16(copy.deepcopy(model))
        elif path.precision == "int8":
            model = quantize_int8(copy.deepcopy(model))
        self.model = model.eval()

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    @torch.no_grad()
    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        out = self.model(fbank).float()
        if self.reference is not None:
            out = self._verify(fbank, out)
        return out

    def _verify(self, fbank: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Compare the first window with fp32; keep the path if within the bound, else fall back."""
        reference, self.reference = self.reference, None
        expected = reference(fbank[:1].float()).float()
        cosine = cosine_per_window(out[:1], expected)
        if out.dim() == 3:  # tokens [N, 1 + P, D]: the CLS token on its own too
            cosine = torch.minimum(cosine, cosine_per_window(out[:1, 0], expected[:, 0]))
        if float(cosine.min()) >= COSINE_BOUND:
            return out
        self.path = dataclasses.replace(self.path, precision="fp32", verify=False, reason=(
            f"bf16 fell back to fp32: cosine similarity {float(cosine.min()):.5f} to fp32 on the first window, "
            f"below {COSINE_BOUND}"))
        logger.warning(self.path.describe())
        self.model = reference
        return reference(fbank.float()).float()


def for_inference(model: nn.Module, device: str = "cpu", precision: str = "auto") -> InferenceModel:
    """``model`` (fp32, eval mode, holding an SSLAM ``Encoder``) on ``device`` on the path
    ``choose_path(device, precision)``; "auto" keeps fp32 for a module without an ``Encoder``."""
    path = choose_path(device, precision)
    if path.precision != "fp32" and not any(isinstance(m, Encoder) for m in model.modules()):
        if precision != "auto":
            raise ValueError(f"precision {precision!r} converts SSLAM / EAT encoders; {type(model).__name__} holds none")
        path = InferencePath("fp32", path.device, "no SSLAM / EAT encoder in the module")
    return InferenceModel(model.to(device), path)
