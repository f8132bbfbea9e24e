"""Streaming GGUF (v3) and safetensors writers for synthetic models.

Both containers put every tensor's size in the header, so the header is written first
and the data follows one tensor at a time, generated chunk by chunk: the writer never
holds more than one chunk (~50 MB) whatever the model size.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .dtypes import GGMLType, check_format, check_weight_type, storage_type
from .layouts import TensorSpec
from .tensordata import iter_tensor_bytes

__all__ = [
    "GGUF_ALIGNMENT",
    "PlannedTensor",
    "MetaValue",
    "plan_tensors",
    "gguf_header",
    "safetensors_header",
    "file_size",
    "write_gguf",
    "write_safetensors",
    "write_file",
]

log = logging.getLogger("sdcpp_py.synthetic")

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
GGUF_ALIGNMENT = 32

MetaValue = str | int | float | bool

# GGUF metadata value types
_GGUF_UINT32 = 4
_GGUF_INT32 = 5
_GGUF_FLOAT32 = 6
_GGUF_BOOL = 7
_GGUF_STRING = 8
_GGUF_UINT64 = 10
_GGUF_INT64 = 11


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor of a layout together with the type it is stored in."""

    spec: TensorSpec
    gtype: GGMLType

    @property
    def nbytes(self) -> int:
        """Bytes of the stored data (without alignment padding)."""
        return self.gtype.nbytes(self.spec.numel)


def plan_tensors(specs: Sequence[TensorSpec], wtype: str, fmt: str = "gguf") -> list[PlannedTensor]:
    """Choose the stored type of every tensor (see :func:`dtypes.storage_type`)."""
    wtype = check_weight_type(wtype, fmt)
    names: set[str] = set()
    planned = []
    for spec in specs:
        if spec.name in names:
            raise ValueError(f"duplicate tensor name {spec.name!r}")
        names.add(spec.name)
        planned.append(PlannedTensor(spec, storage_type(spec, wtype)))
    return planned


def _pad(n: int, alignment: int) -> int:
    return (alignment - n % alignment) % alignment


# ---------------------------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------------------------


def _gguf_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _gguf_kv(key: str, value: MetaValue) -> bytes:
    out = _gguf_str(key)
    if isinstance(value, bool):
        return out + struct.pack("<IB", _GGUF_BOOL, int(value))
    if isinstance(value, int):
        if key == "general.alignment" or 0 <= value < 2**32:
            return out + struct.pack("<II", _GGUF_UINT32, value)
        if -(2**31) <= value < 0:
            return out + struct.pack("<Ii", _GGUF_INT32, value)
        if value >= 0:
            return out + struct.pack("<IQ", _GGUF_UINT64, value)
        return out + struct.pack("<Iq", _GGUF_INT64, value)
    if isinstance(value, float):
        return out + struct.pack("<If", _GGUF_FLOAT32, value)
    if isinstance(value, str):
        return out + struct.pack("<I", _GGUF_STRING) + _gguf_str(value)
    raise TypeError(f"unsupported GGUF metadata value for {key}: {type(value).__name__}")


def gguf_header(planned: Sequence[PlannedTensor], metadata: Mapping[str, MetaValue],
                alignment: int = GGUF_ALIGNMENT) -> tuple[bytes, list[int]]:
    """Header bytes (padded to ``alignment``) and each tensor's offset in the data section.

    ``metadata`` must contain ``general.architecture``; ``general.alignment`` is added.
    """
    if "general.architecture" not in metadata:
        raise ValueError("GGUF metadata needs general.architecture")
    kv = dict(metadata)
    kv["general.alignment"] = alignment
    parts = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(planned), len(kv))]
    parts += [_gguf_kv(k, v) for k, v in kv.items()]
    offsets = []
    offset = 0
    for t in planned:
        ne = t.spec.ne or (1,)  # ggml stores a scalar as a 1-element vector
        parts.append(_gguf_str(t.spec.name))
        parts.append(struct.pack(f"<I{len(ne)}Q", len(ne), *ne))
        parts.append(struct.pack("<IQ", t.gtype.ggml_id, offset))
        offsets.append(offset)
        offset += t.nbytes + _pad(t.nbytes, alignment)
    header = b"".join(parts)
    return header + b"\0" * _pad(len(header), alignment), offsets


# ---------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------


def safetensors_header(planned: Sequence[PlannedTensor], metadata: Mapping[str, MetaValue]) -> bytes:
    """The 8-byte length plus the JSON header (space-padded to a multiple of 8)."""
    header: dict[str, object] = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    offset = 0
    for t in planned:
        dtype = t.gtype.safetensors_dtype
        if dtype is None:
            raise ValueError(f"{t.spec.name}: {t.gtype.name} cannot be stored in safetensors")
        header[t.spec.name] = {"dtype": dtype, "shape": list(t.spec.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    js = json.dumps(header, separators=(",", ":")).encode("utf-8")
    js += b" " * _pad(len(js), 8)
    return struct.pack("<Q", len(js)) + js


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def file_size(planned: Sequence[PlannedTensor], metadata: Mapping[str, MetaValue], fmt: str) -> int:
    """Exact size in bytes of the file :func:`write_file` produces."""
    fmt = check_format(fmt)
    if fmt == "gguf":
        header, offsets = gguf_header(planned, metadata)
        if not planned:
            return len(header)
        return len(header) + offsets[-1] + planned[-1].nbytes + _pad(planned[-1].nbytes, GGUF_ALIGNMENT)
    return len(safetensors_header(planned, metadata)) + sum(t.nbytes for t in planned)


def _write_tensor(f: BinaryIO, t: PlannedTensor, seed: int) -> int:
    written = 0
    for chunk in iter_tensor_bytes(t.spec, t.gtype, seed):
        mv = chunk.data.cast("B")
        f.write(mv)
        written += mv.nbytes
    if written != t.nbytes:
        raise RuntimeError(f"{t.spec.name}: wrote {written} bytes, expected {t.nbytes}")
    return written


def write_gguf(f: BinaryIO, planned: Sequence[PlannedTensor], *, seed: int,
               metadata: Mapping[str, MetaValue]) -> int:
    """Write a GGUF v3 file to the open binary file ``f``; returns the bytes written."""
    header, _ = gguf_header(planned, metadata)
    f.write(header)
    total = len(header)
    for t in planned:
        total += _write_tensor(f, t, seed)
        pad = _pad(t.nbytes, GGUF_ALIGNMENT)
        f.write(b"\0" * pad)
        total += pad
    return total


def write_safetensors(f: BinaryIO, planned: Sequence[PlannedTensor], *, seed: int,
                      metadata: Mapping[str, MetaValue]) -> int:
    """Write a safetensors file to the open binary file ``f``; returns the bytes written."""
    header = safetensors_header(planned, metadata)
    f.write(header)
    total = len(header)
    for t in planned:
        total += _write_tensor(f, t, seed)
    return total


def write_file(path: str | os.PathLike[str], planned: Sequence[PlannedTensor], *, seed: int,
               metadata: Mapping[str, MetaValue], fmt: str) -> int:
    """Write ``planned`` to ``path`` in ``fmt``, atomically: a temporary file in the same folder
    is renamed to ``path`` only once complete, so an interrupted write never leaves ``path``.

    Returns the file size in bytes.
    """
    fmt = check_format(fmt)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    t0 = time.perf_counter()
    try:
        with open(tmp, "wb") as f:
            if fmt == "gguf":
                size = write_gguf(f, planned, seed=seed, metadata=metadata)
            else:
                size = write_safetensors(f, planned, seed=seed, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dt = time.perf_counter() - t0
    log.info("wrote %s: %d tensors, %.1f MiB in %.2f s (%.0f MiB/s)", path, len(planned),
             size / 2**20, dt, size / 2**20 / max(dt, 1e-9))
    return size
