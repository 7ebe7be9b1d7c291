"""Optional Triton import: the package works (with its PyTorch references) where Triton is absent."""
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl

    triton_available = True
except ImportError:
    triton = None
    tl = None
    triton_available = False


def use_triton_for(use_triton: Optional[bool], x: torch.Tensor, op: str) -> bool:
    """Whether ``op`` takes its Triton path: ``None`` picks it for CUDA tensors when Triton is
    installed (the PyTorch reference otherwise); ``True`` forces it, which needs Triton."""
    if use_triton is None:
        return x.is_cuda and triton_available
    if use_triton and not triton_available:
        raise RuntimeError(f"{op}(use_triton=True) needs the triton package, which is not installed "
                           "(pip install triton); use_triton=None runs the PyTorch path without it")
    return bool(use_triton)
