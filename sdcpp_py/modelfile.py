"""Read model files' headers (GGUF, safetensors) without loading their data.

The engine aborts the process on many malformed inputs, so files are checked
here first: the header must parse, every tensor must lie inside the file, and
the names tell the model family and the sizes that must agree between the
diffusion model, the text encoder and the VAE.

Why our own readers rather than the ``gguf`` (ggml-org) and ``safetensors`` packages:
measured with ``python benchmarks/header_readers.py --repeat 5`` (gguf 0.19.0, safetensors
0.8.0, Python 3.11, 2 cores; one fresh process per reader; first call / best of 5, and the
peak RSS the reads add):

==============================================  =======================  ======================
file (synthetic, real layout)                   ours                     package
==============================================  =======================  ======================
Z-Image DiT, full size, Q8_0 GGUF, 453 tensors  3.7 / 2.1 ms, 0.2 MiB    46 / 37 ms, 3.7 MiB
Qwen3-4B GGUF + tokenizer (152k tokens/merges)  94 / 60 ms, 0.1 MiB      14.2 / 10.8 s, 496 MiB
FLUX.1 VAE, full size, F16 safetensors          1.1 / 0.9 ms, 0.2 MiB    152 / 0.6 ms, 20 MiB
==============================================  =======================  ======================

``GGUFReader`` maps the whole file and builds numpy views of every value, two per string of
a tokenizer: seconds and hundreds of MiB for a header a pipeline reads once. safetensors' Rust
parser equals ours after its first call, which pays 150 ms and 20 MiB; it also rejects files
with bytes between or after the tensors, which the engine loads. On the broken files the tests
use (truncated, empty, random bytes, unknown version) both packages raise bare ``ValueError``,
``IndexError`` or ``SafetensorError`` without the tensor at fault; ours raise
CorruptModelError naming it. So neither is a dependency. GGUF arrays longer than 64 values
(a tokenizer) are skipped, not decoded: 60 ms, where decoding them (as this reader did before)
took 520 ms.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

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


_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
# GGUF value type -> its fixed-size layout (8 string and 9 array are read apart)
_GGUF_SCALARS = {vtype: struct.Struct(fmt) for vtype, fmt in (
    (0, "<B"), (1, "<b"), (2, "<H"), (3, "<h"), (4, "<I"), (5, "<i"), (6, "<f"), (7, "<?"),
    (10, "<Q"), (11, "<q"), (12, "<d"))}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_MAX_ARRAY_KEPT = 64       # longer arrays (a tokenizer's vocabulary) are skipped, not decoded


class _GGUFCursor:
    """Reads a GGUF header through a window of the file's bytes, filled by large reads.

    Plain reads, not mmap: a file truncated while it is read gives an exception here, where a
    mapping would kill the process with SIGBUS. Skipped bytes (long arrays) are seeked over."""

    _CHUNK = 64 << 10

    def __init__(self, f: BinaryIO, p: Path, size: int) -> None:
        self.f, self.p, self.size = f, p, size
        self.buf = bytearray()
        self.base = 0          # the file offset of buf[0]
        self.pos = 0           # the cursor, in buf (past its end after a skip)

    @property
    def offset(self) -> int:
        """The cursor's offset in the file."""
        return self.base + self.pos

    def _truncated(self) -> CorruptModelError:
        return CorruptModelError(f"{self.p}: truncated GGUF header")

    def _need(self, n: int) -> None:
        """Make ``n`` bytes from the cursor available in buf."""
        if self.pos + n <= len(self.buf):
            return
        if self.offset + n > self.size:
            raise self._truncated()
        if self.pos > len(self.buf):              # skipped past the window: no need to read that
            self.f.seek(self.pos - len(self.buf), 1)
        del self.buf[:self.pos]                   # the window holds what is still to be read
        self.base += self.pos
        self.pos = 0
        while len(self.buf) < n:
            chunk = self.f.read(max(self._CHUNK, n - len(self.buf)))
            if not chunk:
                raise self._truncated()
            self.buf += chunk

    def _unpack(self, s: struct.Struct) -> tuple[Any, ...]:
        self._need(s.size)
        values = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return values

    def u32(self) -> int:
        n: int = self._unpack(_U32)[0]
        return n

    def u64(self) -> int:
        n: int = self._unpack(_U64)[0]
        return n

    def skip(self, n: int) -> None:
        if self.offset + n > self.size:
            raise self._truncated()
        self.pos += n

    def _string_length(self) -> int:
        n = self.u64()
        if n > _MAX_STRING:
            raise CorruptModelError(f"{self.p}: implausible string length {n} in GGUF header")
        return n

    def string(self) -> str:
        n = self._string_length()
        self._need(n)
        start = self.pos
        self.pos += n
        return self.buf[start:self.pos].decode("utf-8")

    def value(self, vtype: int, depth: int = 0) -> object:
        scalar = _GGUF_SCALARS.get(vtype)
        if scalar is not None:
            v: object = self._unpack(scalar)[0]
            return v
        if vtype == _GGUF_STRING:
            return self.string()
        if vtype == _GGUF_ARRAY and depth == 0:
            etype, n = self.u32(), self.u64()
            if n > _MAX_COUNT * 4:
                raise CorruptModelError(f"{self.p}: implausible array length {n} in GGUF header")
            if n <= _MAX_ARRAY_KEPT:
                return [self.value(etype, 1) for _ in range(n)]
            self._skip_array(etype, n)
            return f"<array of {n}>"
        raise CorruptModelError(f"{self.p}: unknown GGUF value type {vtype}")

    def _skip_array(self, etype: int, n: int) -> None:
        scalar = _GGUF_SCALARS.get(etype)
        if scalar is not None:
            self.skip(n * scalar.size)
            return
        if etype != _GGUF_STRING:
            raise CorruptModelError(f"{self.p}: unknown GGUF value type {etype}")
        unpack = _U64.unpack_from           # the hot loop of a tokenizer's 150k strings
        for _ in range(n):
            if self.pos + 8 > len(self.buf):
                self._need(8)
            length = unpack(self.buf, self.pos)[0]
            if length > _MAX_STRING:
                raise CorruptModelError(f"{self.p}: implausible string length {length} in GGUF header")
            self.pos += 8 + length
        if self.offset > self.size:
            raise self._truncated()


def _read_gguf(p: Path, f: BinaryIO, size: int) -> ModelFile:
    r = _GGUFCursor(f, p, size)
    r.skip(4)   # the magic
    version = r.u32()
    if version not in (2, 3):
        raise CorruptModelError(f"{p}: unsupported GGUF version {version}")
    n_tensors, n_kv = r.u64(), r.u64()
    if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
        raise CorruptModelError(f"{p}: implausible GGUF counts ({n_tensors} tensors, {n_kv} keys)")
    metadata: dict[str, object] = {}
    for _ in range(n_kv):
        key = r.string()
        metadata[key] = r.value(r.u32())
    raw = []
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.u32()
        if n_dims > 8:
            raise CorruptModelError(f"{p}: tensor {name} has {n_dims} dimensions")
        ne = [r.u64() for _ in range(n_dims)]
        raw.append((name, ne, r.u32(), r.u64()))
    raw_alignment = metadata.get("general.alignment", 32)
    alignment = raw_alignment if isinstance(raw_alignment, int) else -1
    if alignment <= 0:
        raise CorruptModelError(f"{p}: bad GGUF alignment {alignment}")
    data_start = -(-r.offset // alignment) * alignment
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
