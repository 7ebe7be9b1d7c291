import os

# Triton kernels run on the CPU only through its interpreter, which must be chosen before any
# kernel is defined; on a CUDA machine the real compiler is used.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
