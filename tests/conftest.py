import importlib.util
import os
import sys

import pytest

# Triton kernels run on the CPU only through its interpreter, which must be chosen before any
# kernel is defined; on a CUDA machine the real compiler is used.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# sslam_kernels is this tree's kernels/sslam_kernels/, also where an editable install of another
# checkout (a second worktree, say) would provide its own.
_KERNELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels", "sslam_kernels")
# Child processes (the CLI and launch tests, and loader workers started from a fork server once
# DALI is loaded) import this tree's packages too, installed or not.
os.environ["PYTHONPATH"] = os.pathsep.join(
    filter(None, [os.path.dirname(os.path.dirname(_KERNELS)), os.path.dirname(_KERNELS), os.environ.get("PYTHONPATH")]))
if "sslam_kernels" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("sslam_kernels", os.path.join(_KERNELS, "__init__.py"),
                                                   submodule_search_locations=[_KERNELS])
    sys.modules["sslam_kernels"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["sslam_kernels"])


@pytest.fixture(autouse=True)
def _fresh_compile_caches():
    """Each test compiles from scratch: graphs compiled by an earlier test (other shapes, other
    modules) otherwise mark dimensions dynamic and send a later compile down another path."""
    yield
    if "torch._dynamo" in sys.modules:
        sys.modules["torch._dynamo"].reset()
