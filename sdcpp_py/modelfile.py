"""Read model files' headers (GGUF, safetensors) without loading their data.

The engine aborts the process on many malformed inputs, so files are checked
here first: the header must parse, every tensor must lie inside the file, and
the names tell the model family and the sizes that must agree between the
diffusion model, the text encoder and the VAE.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .errors import CorruptModelError, ModelNotFoundError

PathLike = str | Path

# ggml type id -> (name, elements per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}
SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                      "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}

_MAX_COUNT = 1 << 24       # tensors or metadata entries in a sane file
_MAX_STRING = 1 << 24


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order (outermost first); GGUF's ne order reversed
    dtype: str


@dataclass
class ModelFile:
    path: Path
    format: str  # "gguf" | "safetensors"
    tensors: dict[str, TensorInfo]
    metadata: dict[str, object] = field(default_factory=dict)

    def find(self, suffix: str) -> TensorInfo | None:
        """The tensor whose name is ``suffix`` or ends with ``"." + suffix``."""
        t = self.tensors.get(suffix)
        if t is not None:
            return t
        dotted = "." + suffix
        for name, info in self.tensors.items():
            if name.endswith(dotted):
                return info
        return None

    def count_blocks(self, marker: str) -> int:
        """1 + the largest N in names containing ``marker + "N."`` (0 if none)."""
        best = -1
        for name in self.tensors:
            i = name.find(marker)
            if i < 0 or (i > 0 and name[i - 1] != "."):
                continue
            digits = name[i + len(marker):].split(".", 1)[0]
            if digits.isdigit():
                best = max(best, int(digits))
        return best + 1


def inspect(path: PathLike) -> ModelFile:
    """Parse the header of a GGUF or safetensors file.

    Raises ModelNotFoundError for a missing file and CorruptModelError for one
    that is not a complete GGUF or safetensors file.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelNotFoundError(f"model file not found: {p}")
    size = p.stat().st_size
    with p.open("rb") as f:
        magic = f.read(8)
        f.seek(0)
        try:
            if magic[:4] == b"GGUF":
                return _read_gguf(p, f, size)
            if len(magic) == 8:
                n = struct.unpack("<Q", magic)[0]
                if 2 <= n <= min(size - 8, 100 << 20):
                    return _read_safetensors(p, f, size)
        except CorruptModelError:
            raise
        except (struct.error, UnicodeDecodeError, ValueError, KeyError, TypeError, OverflowError) as e:
            raise CorruptModelError(f"{p}: unreadable header ({e})") from e
    raise CorruptModelError(f"{p}: neither a GGUF nor a safetensors file")


def _read_safetensors(p: Path, f: BinaryIO, size: int) -> ModelFile:
    n = struct.unpack("<Q", f.read(8))[0]
    raw = f.read(n)
    if len(raw) != n:
        raise CorruptModelError(f"{p}: truncated safetensors header")
    header = json.loads(raw)
    if not isinstance(header, dict):
        raise CorruptModelError(f"{p}: safetensors header is not a JSON object")
    data_size = size - 8 - n
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        dtype = entry["dtype"]
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(x) for x in entry["data_offsets"])
        width = SAFETENSORS_DTYPES.get(dtype)
        if width is None:
            raise CorruptModelError(f"{p}: tensor {name} has unknown dtype {dtype}")
        count = 1
        for d in shape:
            if d < 0:
                raise CorruptModelError(f"{p}: tensor {name} has a negative dimension")
            count *= d
        if end - begin != count * width or begin < 0 or end > data_size:
            raise CorruptModelError(
                f"{p}: tensor {name} ({dtype} {list(shape)}) does not fit the file "
                f"(offsets {begin}..{end}, {data_size} data bytes): truncated or corrupt")
        tensors[name] = TensorInfo(name, shape, dtype)
    return ModelFile(p, "safetensors", tensors, dict(metadata))


class _GGUFReader:
    def __init__(self, f: BinaryIO, p: Path) -> None:
        self.f, self.p = f, p

    def take(self, fmt: str):
        data = self.f.read(struct.calcsize(fmt))
        if len(data) != struct.calcsize(fmt):
            raise CorruptModelError(f"{self.p}: truncated GGUF header")
        return struct.unpack(fmt, data)[0]

    def string(self) -> str:
        n = self.take("<Q")
        if n > _MAX_STRING:
            raise CorruptModelError(f"{self.p}: implausible string length {n} in GGUF header")
        data = self.f.read(n)
        if len(data) != n:
            raise CorruptModelError(f"{self.p}: truncated GGUF header")
        return data.decode("utf-8")

    _SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                10: "<Q", 11: "<q", 12: "<d"}

    def value(self, vtype: int, depth: int = 0):
        if vtype in self._SCALARS:
            return self.take(self._SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9 and depth == 0:
            etype, n = self.take("<I"), self.take("<Q")
            if n > _MAX_COUNT * 4:
                raise CorruptModelError(f"{self.p}: implausible array length {n} in GGUF header")
            values = [self.value(etype, 1) for _ in range(n)]
            return values if n <= 64 else f"<array of {n}>"
        raise CorruptModelError(f"{self.p}: unknown GGUF value type {vtype}")


def _read_gguf(p: Path, f: BinaryIO, size: int) -> ModelFile:
    r = _GGUFReader(f, p)
    f.read(4)
    version = r.take("<I")
    if version not in (2, 3):
        raise CorruptModelError(f"{p}: unsupported GGUF version {version}")
    n_tensors, n_kv = r.take("<Q"), r.take("<Q")
    if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
        raise CorruptModelError(f"{p}: implausible GGUF counts ({n_tensors} tensors, {n_kv} keys)")
    metadata: dict[str, object] = {}
    for _ in range(n_kv):
        key = r.string()
        metadata[key] = r.value(r.take("<I"))
    raw = []
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.take("<I")
        if n_dims > 8:
            raise CorruptModelError(f"{p}: tensor {name} has {n_dims} dimensions")
        ne = [r.take("<Q") for _ in range(n_dims)]
        raw.append((name, ne, r.take("<I"), r.take("<Q")))
    raw_alignment = metadata.get("general.alignment", 32)
    alignment = raw_alignment if isinstance(raw_alignment, int) else -1
    if alignment <= 0:
        raise CorruptModelError(f"{p}: bad GGUF alignment {alignment}")
    data_start = -(-f.tell() // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, ne, type_id, offset in raw:
        if type_id not in GGML_TYPES:
            raise CorruptModelError(f"{p}: tensor {name} has unknown ggml type {type_id}")
        tname, block, block_bytes = GGML_TYPES[type_id]
        count = 1
        for d in ne:
            count *= d
        if ne and ne[0] % block:
            raise CorruptModelError(f"{p}: tensor {name}: row of {ne[0]} is not whole {tname} blocks")
        nbytes = count // block * block_bytes
        if data_start + offset + nbytes > size:
            raise CorruptModelError(
                f"{p}: tensor {name} ({tname} {list(reversed(ne))}) ends past the end of the file: "
                f"truncated or corrupt")
        tensors[name] = TensorInfo(name, tuple(reversed(ne)), tname)
    return ModelFile(p, "gguf", tensors, metadata)
