"""Reading and writing torch files safely: nothing read from a file is ever executed.

``safe_load`` is the one way this project reads a ``.pt`` file (released checkpoints, ``init_from``,
the trainer's own resume files, DeepSpeed's engine files). A pickle can name any importable
function and have it called while loading, so every file is read by one bounded, allow-list
unpickler (pure Python, so that each opcode can be checked):

- the globals that plain weights need (torch's tensor rebuild functions, storage types, dtypes,
  ``OrderedDict``, ``argparse.Namespace``) resolve to the real thing; numpy arrays and scalars only
  of plain numeric dtypes, through constructors that check the dtype and the byte length;
- a global of a package whose checkpoints hold only data objects (fairseq, omegaconf, hydra)
  becomes an inert placeholder that records what it was given and can do nothing else; so does
  the one class of the original fine-tuning code that fine-tuned checkpoints pickle, the enum
  ``PredictionMode`` of ``<user_dir>.models.EAT_audio_classification`` (the user_dir package name
  varies: "EAT", "SSLAM_Stage2", ...); the caller may name more classes to resolve for real
  (DeepSpeed's loss scaler and ZeRO enums in its engine files);
- any other global (``os.system``, ``builtins.eval``, ``subprocess.call``, a class of some other
  package...) refuses the load with an error that names the file and the global;
- only allowed callables may be called, only objects of allowed types may have state set, the
  memo, the nesting depth and the bytes of tensor storage are bounded (storage by the file's size).

Any malformed content is a ``CheckpointError`` naming the file, never another exception.
"""
import _compat_pickle
import argparse
import collections
import enum
import io
import math
import os
import pickle
import stat
import tarfile
import tempfile
import types
from functools import wraps
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch

# Packages whose pickled objects in original checkpoints are data (meters, configs).
PLACEHOLDER_PACKAGES = ("fairseq", "omegaconf", "hydra")
# (module suffix, name) of data classes of the original fine-tuning code, under any user_dir package.
PLACEHOLDER_CLASSES = ((".models.EAT_audio_classification", "PredictionMode"),)

MAX_MEMO = 1 << 20  # memo entries; a large fairseq checkpoint uses a few thousand
MAX_DEPTH = 100  # nesting of containers in a loaded object; real checkpoints nest under 10 deep


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


# --------------------------------------------------------------------------- numpy, checked
_NUMPY_KINDS = "biufc"  # bool, int, unsigned, float, complex: no objects, strings, records or voids


class _NumpyArrayType:
    """What the global ``numpy.ndarray`` resolves to: only ``_reconstruct`` accepts it."""


def _plain_dtype(dtype) -> np.dtype:
    if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMPY_KINDS or dtype.hasobject or dtype.fields \
            or dtype.subdtype is not None or dtype.itemsize != np.dtype(dtype.str).itemsize:
        raise pickle.UnpicklingError(f"numpy dtype {dtype!s:.40} is not a plain numeric dtype")
    return dtype


def _numpy_dtype(obj, align=False, copy=False) -> np.dtype:
    """``numpy.dtype(obj)`` for the type codes of plain numeric dtypes only (a fresh copy: its state
    is set next)."""
    if not isinstance(obj, str) or len(obj) > 4 or align is not False:
        raise pickle.UnpicklingError(f"numpy dtype {obj!r:.40} is not a plain numeric dtype")
    return _plain_dtype(np.dtype(obj, align=False, copy=True))


def _set_dtype_state(dtype: np.dtype, state) -> None:
    """The BUILD of a dtype: only its byte order may differ from the canonical state of its type."""
    canonical = dtype.__reduce__()[2]
    if not (isinstance(state, tuple) and len(state) == len(canonical) and state[1] in ("<", ">", "|", "=")
            and state[0] == canonical[0] and state[2:] == canonical[2:]):
        raise pickle.UnpicklingError(f"numpy dtype state {state!r:.80} is not that of a plain numeric dtype")
    dtype.__setstate__(state)
    _plain_dtype(dtype)


def _numpy_reconstruct(subtype, shape, code) -> np.ndarray:
    if subtype is not _NumpyArrayType or shape != (0,) or code not in (b"b", "b"):
        raise pickle.UnpicklingError("numpy _reconstruct called with other arguments than an array pickle's")
    return np.ndarray((0,), np.int8)


def _set_array_state(array: np.ndarray, state) -> None:
    """The BUILD of an array: version 1, a shape of small non-negative ints, a plain dtype and raw
    bytes of exactly the length that shape and dtype need."""
    if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1 and isinstance(state[1], tuple)
            and len(state[1]) <= 32 and all(type(n) is int and n >= 0 for n in state[1])
            and isinstance(state[3], bool) and type(state[4]) is bytes):
        raise pickle.UnpicklingError("numpy array state is not that of a plain numeric array")
    dtype = _plain_dtype(state[2])
    if math.prod(state[1]) * dtype.itemsize != len(state[4]):
        raise pickle.UnpicklingError(f"numpy array of shape {state[1]} and dtype {dtype} needs "
                                     f"{math.prod(state[1]) * dtype.itemsize} bytes, the file holds {len(state[4])}")
    array.__setstate__(state)


def _numpy_scalar(dtype, data):
    if type(data) is not bytes or len(data) != _plain_dtype(dtype).itemsize:
        raise pickle.UnpicklingError("numpy scalar of another byte length than its dtype's")
    return np.frombuffer(data, dtype=dtype)[0].copy()


_NUMPY_GLOBALS = {
    ("numpy", "ndarray"): _NumpyArrayType,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}


# --------------------------------------------------------------------------- torch and plain globals
def _without_hooks(rebuild: Callable, hooks_at: Optional[int]) -> Callable:
    """torch's ``rebuild`` refusing backward hooks from the file (they would be called in backward)."""
    @wraps(rebuild)
    def checked(*args):
        if hooks_at is not None and len(args) > hooks_at and args[hooks_at]:
            raise pickle.UnpicklingError("a tensor with backward hooks")
        return rebuild(*args)
    return checked


# name -> the argument position of its backward hooks
_HOOKS_AT = {"_rebuild_tensor": None, "_rebuild_tensor_v2": 5, "_rebuild_tensor_v3": 5, "_rebuild_parameter": 2,
             "_rebuild_parameter_with_state": 2}
_TENSOR_REBUILDERS = {name: _without_hooks(getattr(torch._utils, name), at) for name, at in _HOOKS_AT.items()
                      if hasattr(torch._utils, name)}


def _rebuild_from_type_v2(func, new_type, args, state):
    """torch's ``_rebuild_from_type_v2`` for plain tensors and parameters rebuilt by an allowed function."""
    if func not in _TENSOR_REBUILDERS.values() or new_type not in (torch.Tensor, torch.nn.Parameter):
        raise pickle.UnpicklingError("_rebuild_from_type_v2 of something other than a tensor")
    return torch._tensor._rebuild_from_type_v2(func, new_type, args, state)


def _bytearray(*args):
    if not args or not isinstance(args[0], (bytes, str)):  # bytearray(n) would allocate n bytes
        raise pickle.UnpicklingError("bytearray of something other than bytes")
    return bytearray(*args)


def _codecs_encode(text, encoding="utf-8"):
    """How protocol-2 pickles store bytes: ``_codecs.encode(str, "latin1")``."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode of something other than latin-1 text")
    return text.encode("latin1")


_PLAIN_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): argparse.Namespace,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): _bytearray,
    ("_codecs", "encode"): _codecs_encode,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("torch", "Size"): torch.Size,
}
_CALLABLE = ({f for f in _PLAIN_GLOBALS.values() if f is not torch.nn.Parameter} | set(_TENSOR_REBUILDERS.values())
             | {_numpy_dtype, _numpy_reconstruct, _numpy_scalar})
# Objects whose state a pickle may set as attributes (a state dict's ``_metadata``, a Namespace).
_STATEFUL = (collections.OrderedDict, argparse.Namespace, Placeholder)


def _weights_global(module: str, name: str):
    """The tensor-rebuild functions, storage types, dtypes, numpy's checked constructors and the
    plain containers of a weights file; None for anything else."""
    if (module, name) in _PLAIN_GLOBALS:
        return _PLAIN_GLOBALS[(module, name)]
    if (module, name) in _NUMPY_GLOBALS:
        return _NUMPY_GLOBALS[(module, name)]
    if module == "torch" and (name.endswith("Storage") and isinstance(getattr(torch, name, None), type)
                              or isinstance(getattr(torch, name, None), torch.dtype)):
        return getattr(torch, name)
    if module == "torch._utils":
        return _TENSOR_REBUILDERS.get(name)
    return None


class _BoundedUnpickler(pickle._Unpickler):
    """The pure-Python unpickler with every opcode that can call, set state, allocate or nest checked."""

    path = "?"
    real: Dict[str, type] = {}  # "module.name" -> the class itself (trusted by the caller)
    budget = 0  # bytes of tensor storage the file may ask for

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module, name):
        if not isinstance(module, str) or not isinstance(name, str):
            raise pickle.UnpicklingError("a global whose name is not text")
        if self.proto < 3 and self.fix_imports:  # Python 2 names, as pickle itself maps them
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            else:
                module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = _weights_global(module, name)
        if found is not None:
            return found
        if f"{module}.{name}" in self.real:
            return self.real[f"{module}.{name}"]
        if module.split(".")[0] in PLACEHOLDER_PACKAGES or any(
                module.endswith(suffix) and name == cls for suffix, cls in PLACEHOLDER_CLASSES):
            return _placeholder(module, name)
        raise UnsafeCheckpointError(
            f"{self.path}: refused: the file names the global {module}.{name}, which a checkpoint has no reason to "
            "hold (nothing from the file was run)")

    def _callable(self, func) -> bool:
        return func in _CALLABLE or isinstance(func, type) and (issubclass(func, Placeholder) or func in self.real.values())

    def _call(self, func, args, kwargs=None):
        if not self._callable(func):
            raise pickle.UnpicklingError(f"the file calls {func!r:.60}, which is not a constructor it may call")
        if not isinstance(args, tuple):
            raise pickle.UnpicklingError("call arguments are not a tuple")
        return func(*args, **(kwargs or {}))

    def load_reduce(self):
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)
    dispatch[pickle.REDUCE[0]] = load_reduce

    def _new(self, cls, args, kwargs=None):
        if not (isinstance(cls, type) and (issubclass(cls, Placeholder) or cls in self.real.values()
                                           or cls in (collections.OrderedDict, argparse.Namespace, set, frozenset))):
            raise pickle.UnpicklingError(f"the file makes a {cls!r:.60}, which is not a class it may make")
        if not isinstance(args, tuple) or not isinstance(kwargs or {}, dict):
            raise pickle.UnpicklingError("constructor arguments are not a tuple")
        return cls.__new__(cls, *args, **(kwargs or {}))

    def load_newobj(self):
        args = self.stack.pop()
        self.stack[-1] = self._new(self.stack[-1], args)
    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        self.stack[-1] = self._new(self.stack[-1], args, kwargs)
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def _instantiate(self, klass, args):
        self.append(self._call(klass, tuple(args)))

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, np.dtype):
            _set_dtype_state(inst, state)
        elif type(inst) is np.ndarray:
            _set_array_state(inst, state)
        elif isinstance(inst, Placeholder):
            inst.__setstate__(state)
        elif isinstance(inst, _STATEFUL) or type(inst) in self.real.values() and not isinstance(inst, enum.Enum):
            if not isinstance(state, dict) or not all(type(k) is str for k in state):
                raise pickle.UnpicklingError(f"the state of a {type(inst).__name__} is not a mapping of names")
            inst.__dict__.update(state)
        else:
            raise pickle.UnpicklingError(f"the file sets the state of a {type(inst).__name__:.60}, which it may not")
    dispatch[pickle.BUILD[0]] = load_build

    def _memoize(self, index, value):
        if len(self.memo) >= MAX_MEMO and index not in self.memo:
            raise pickle.UnpicklingError(f"more than {MAX_MEMO} memo entries")
        self.memo[index] = value

    def load_put(self):
        self._memoize(int(self.readline()[:-1]), self.stack[-1])
    dispatch[pickle.PUT[0]] = load_put

    def load_binput(self):
        self._memoize(self.read(1)[0], self.stack[-1])
    dispatch[pickle.BINPUT[0]] = load_binput

    def load_long_binput(self):
        self._memoize(int.from_bytes(self.read(4), "little"), self.stack[-1])
    dispatch[pickle.LONG_BINPUT[0]] = load_long_binput

    def load_memoize(self):
        self._memoize(len(self.memo), self.stack[-1])
    dispatch[pickle.MEMOIZE[0]] = load_memoize

    def load_ext1(self):
        raise pickle.UnpicklingError("extension codes are not used by checkpoints")
    dispatch[pickle.EXT1[0]] = dispatch[pickle.EXT2[0]] = dispatch[pickle.EXT4[0]] = load_ext1

    @property
    def persistent_load(self):
        return self._persistent_load

    @persistent_load.setter
    def persistent_load(self, load: Callable):
        counted = set()

        def bounded(pid):
            # torch's storage ids: ("storage", storage type, key, location, numel, ...); views share a key
            if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
                numel, storage_type, key = pid[4], pid[1], pid[2]
                if type(numel) is not int or numel < 0 or not isinstance(getattr(storage_type, "dtype", None), torch.dtype) \
                        or not isinstance(key, (str, int)):
                    raise pickle.UnpicklingError(f"storage id {pid!r:.80} is malformed")
                if key in counted:
                    return load(pid)
                counted.add(key)
                self.budget -= numel * torch._utils._element_size(storage_type.dtype)
                if self.budget < 0:
                    raise pickle.UnpicklingError("the tensors ask for more bytes than the file holds")
            return load(pid)
        self._persistent_load = bounded


def _check_depth(obj: Any, path: str) -> None:
    """Refuse containers nested deeper than ``MAX_DEPTH`` (later code that walks them would
    recurse that deep); iterative, each object visited once, so cycles end too."""
    seen, todo = set(), [(obj, 0)]
    while todo:
        item, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise CheckpointError(f"{path}: holds values nested more than {MAX_DEPTH} deep")
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, dict):
            children = list(item.keys()) + list(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            children = item
        elif isinstance(item, (Placeholder, argparse.Namespace)):
            children = list(vars(item).values())
        else:
            continue
        todo.extend((child, depth + 1) for child in children)


def _is_torch_file(file) -> bool:
    """torch's zip format, or its pickle-stream legacy format (DeepSpeed writes that one); never the
    tar format, which torch would extract to disk. Leaves ``file`` at its start."""
    head = file.read(4)
    file.seek(0)
    if head == b"PK\x03\x04":
        return True
    tar = tarfile.is_tarfile(file)
    file.seek(0)
    return head[:2] == b"\x80\x02" and not tar


def _load(file, size: int, path: str, map_location, real: Optional[Dict[str, type]]) -> Any:
    if not _is_torch_file(file):
        raise CheckpointError(f"{path}: not a torch checkpoint file (neither torch's zip nor its legacy format)")
    unpickler = type("Unpickler", (_BoundedUnpickler,), {"path": path, "real": dict(real or {}), "budget": size})
    module = types.SimpleNamespace(Unpickler=unpickler, load=lambda f, **kw: unpickler(f, **kw).load(),
                                   __name__="sslam_fast.serialization")
    try:
        obj = torch.load(file, map_location=map_location, weights_only=False, pickle_module=module)
    except UnsafeCheckpointError:
        raise
    except Exception as exc:  # any malformed content, whatever part of torch or pickle notices it
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint ({type(exc).__name__}: {exc!s:.300})") from None
    _check_depth(obj, path)
    return obj


def load_bytes(data: bytes, path: str, map_location="cpu", real: Optional[Dict[str, type]] = None) -> Any:
    """Unpickle the torch file whose bytes are ``data`` (read from ``path``, named in errors).

    ``real`` maps qualified class names to classes the caller trusts the file to hold (resolved for
    real instead of refused).
    """
    return _load(io.BytesIO(data), len(data), path, map_location, real)


def safe_load(path: str, map_location="cpu") -> Any:
    """Load a torch file without running anything from it.

    The file is opened once (a FIFO or device is refused without blocking) and read from that
    descriptor. Raises ``UnsafeCheckpointError`` when the file names a global that is not allowed,
    and ``CheckpointError`` when there is no file, it is not a regular file or not a readable torch
    file (truncated, corrupt, malformed); every message names the file.
    """
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be opened ({exc.strerror})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: not a regular file")
    with os.fdopen(fd, "rb") as f:
        return _load(f, info.st_size, path, map_location, None)


def names_the_file(load: Callable) -> Callable:
    """Make any failure of ``load(path, ...)`` on malformed content a ``CheckpointError`` naming the file."""
    @wraps(load)
    def checked(path, *args, **kwargs):
        try:
            return load(path, *args, **kwargs)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{os.fspath(path)}: cannot be read ({type(exc).__name__}: {exc!s:.300})") from exc
    return checked


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
