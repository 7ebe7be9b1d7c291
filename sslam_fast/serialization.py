"""Reading and writing torch files safely: nothing read from a file is ever executed.

``safe_load`` is the one way this project reads a ``.pt`` file (released checkpoints, ``init_from``,
the trainer's own resume files). A pickle can name any importable function and have it called
while loading; ``torch.load(weights_only=True)`` refuses such files, but original fairseq
checkpoints also pickle fairseq / omegaconf objects, so a second, allow-list unpickler reads those:

- the globals that plain weights need (torch's tensor and storage rebuild functions, dtypes,
  ``OrderedDict``, ``argparse.Namespace``, numpy's array reconstruction) resolve to the real thing;
- a global of a package whose checkpoints hold only data objects (fairseq, omegaconf, hydra)
  becomes an inert placeholder that records what it was given and can do nothing else; so does
  the one class of the original fine-tuning code that fine-tuned checkpoints pickle, the enum
  ``PredictionMode`` of ``<user_dir>.models.EAT_audio_classification`` (the user_dir package name
  varies: "EAT", "SSLAM_Stage2", ...);
- any other global (``os.system``, ``builtins.eval``, ``subprocess.call``, a class of some other
  package...) refuses the load with an error that names the file and the global.

``vet_pickle_file`` checks a file that another library must read with full pickle (DeepSpeed's
engine state): it unpickles the file with placeholders only, and refuses it unless every global
it names is in the allow-list given for it. Nothing is called during that dry run.
"""
import argparse
import collections
import io
import os
import pickle
import tempfile
import types
from typing import Any, FrozenSet, Iterable

import torch

# Packages whose pickled objects in original checkpoints are data (meters, configs).
PLACEHOLDER_PACKAGES = ("fairseq", "omegaconf", "hydra")
# (module suffix, name) of data classes of the original fine-tuning code, under any user_dir package.
PLACEHOLDER_CLASSES = ((".models.EAT_audio_classification", "PredictionMode"),)

_NUMPY_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
}
_TENSOR_REBUILDERS = {
    "_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
    "_rebuild_parameter_with_state", "_rebuild_sparse_tensor", "_rebuild_nested_tensor",
    "_rebuild_device_tensor_from_numpy", "_rebuild_device_tensor_from_cpu_tensor",
    "_rebuild_meta_tensor_no_storage", "_rebuild_qtensor", "_rebuild_wrapper_subclass",
}
_PLAIN_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): argparse.Namespace,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
}


class CheckpointError(ValueError):
    """A file that cannot be read as the checkpoint asked for; the message names the file (and key)."""


class UnsafeCheckpointError(CheckpointError):
    """A file names a global that is not allowed; nothing from it was run."""


class Placeholder:
    """An inert stand-in for an object of a package that is not trusted (or not installed).

    Calling the placeholder class, or restoring its state, only records the arguments.
    """

    _qualified_name = "?"

    def __init__(self, *args, **kwargs):
        self.args = args
        self.kwargs = kwargs

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<placeholder for {self._qualified_name}>"


def _placeholder(module: str, name: str) -> type:
    return type(name, (Placeholder,), {"__module__": module, "_qualified_name": f"{module}.{name}"})


def _torch_global(module: str, name: str):
    """The tensor-rebuild functions, storage types, dtypes and ``torch.Size`` of a weights file."""
    if module == "torch" and (name.endswith("Storage") or name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
        return getattr(torch, name)
    if module == "torch.storage" and name in ("UntypedStorage", "TypedStorage"):
        return getattr(torch.storage, name)
    if module == "torch._utils" and name in _TENSOR_REBUILDERS:
        return getattr(torch._utils, name, None)
    if module == "torch._tensor" and name == "_rebuild_from_type_v2":
        return torch._tensor._rebuild_from_type_v2
    if module == "torch.nn.parameter" and name == "Parameter":
        return torch.nn.Parameter
    if module == "_codecs" and name == "encode":  # how protocol-2 pickles store bytes
        import _codecs

        return _codecs.encode
    return None


def _allowed(module: str, name: str):
    if (module, name) in _PLAIN_GLOBALS:
        return _PLAIN_GLOBALS[(module, name)]
    if (module, name) in _NUMPY_GLOBALS:
        import importlib

        return getattr(importlib.import_module(module), name)
    return _torch_global(module, name)


class _AllowListUnpickler(pickle.Unpickler):
    path = "?"

    def find_class(self, module, name):
        found = _allowed(module, name)
        if found is not None:
            return found
        if module.split(".")[0] in PLACEHOLDER_PACKAGES or any(
                module.endswith(suffix) and name == cls for suffix, cls in PLACEHOLDER_CLASSES):
            return _placeholder(module, name)
        raise UnsafeCheckpointError(
            f"{self.path}: refused: the file names the global {module}.{name}, which a checkpoint has no reason to "
            "hold (nothing from the file was run)")


def _pickle_module(path: str) -> types.SimpleNamespace:
    unpickler = type("Unpickler", (_AllowListUnpickler,), {"path": path})
    return types.SimpleNamespace(Unpickler=unpickler, load=lambda f, **kw: unpickler(f, **kw).load(),
                                 __name__="sslam_fast.serialization")


def safe_load(path: str, map_location="cpu") -> Any:
    """Load a torch file without running anything from it.

    Raises ``UnsafeCheckpointError`` when the file names a global that is not allowed, and
    ``CheckpointError`` when there is no file or it is not a readable torch file (truncated,
    corrupt); every message names the file.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        pass  # a global outside torch's weights-only set: read again with the allow-list below
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint ({exc})") from exc
    with open(path, "rb") as f:
        data = io.BytesIO(f.read())
    try:
        return torch.load(data, map_location=map_location, weights_only=False, pickle_module=_pickle_module(path))
    except UnsafeCheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint ({exc})") from exc


class _VettingUnpickler(pickle.Unpickler):
    allowed: FrozenSet[str] = frozenset()
    path = "?"

    def find_class(self, module, name):
        found = _allowed(module, name)
        if found is not None:
            return found
        if f"{module}.{name}" not in self.allowed:
            raise UnsafeCheckpointError(
                f"{self.path}: refused: the file names the global {module}.{name}, which it is not expected to "
                "hold (nothing from the file was run)")
        return _placeholder(module, name)


def vet_pickle_file(path: str, allowed: Iterable[str]) -> None:
    """Refuse ``path`` unless every global it names is a weights global or in ``allowed``.

    The file is unpickled once, weights globals resolved as in ``safe_load`` and the ``allowed``
    ones as inert placeholders (tensors land on the meta device), so nothing from it runs; a later
    full-pickle load of the same bytes resolves exactly the globals seen here.
    """
    vetting = type("Unpickler", (_VettingUnpickler,), {"path": path, "allowed": frozenset(allowed)})
    module = types.SimpleNamespace(Unpickler=vetting, load=lambda f, **kw: vetting(f, **kw).load(),
                                   __name__="sslam_fast.serialization.vet")
    try:
        torch.load(path, map_location="meta", weights_only=False, pickle_module=module)
    except UnsafeCheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint ({exc})") from exc


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``: write a temp file in
    the same directory, flush and fsync it, rename it over ``path``, fsync the directory."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(directory)
