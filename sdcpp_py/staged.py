"""The values staged generation passes between its calls, owned by Python.

A :class:`Conditioning` is a text encoding (numpy arrays, the family and the
encoder that made it); a :class:`Latent` is a denoised (or VAE-encoded) latent.
Both cross the FFI as ``sdcpp_tensor_t`` views: the library copies what it is
given and Python copies what it gets back, so no pointer outlives a call.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from ._ffi import ffi, lib
from .errors import InvalidArgumentError, SdcppError

PartKey = Tuple[int, str, int]  # (role: 0 positive / 1 negative, part name, index)
POSITIVE, NEGATIVE = 0, 1
_FORMAT = "sdcpp_py.conditioning/1"


@dataclass(frozen=True, eq=False)
class Conditioning:
    """A prompt's encoding, reusable across seeds, sizes, steps and samplers."""

    parts: Dict[PartKey, np.ndarray]
    family: str
    encoder: str                       # identity of the text encoder that made it
    prompt: str
    negative_prompt: Optional[str] = None
    seconds: float = 0.0               # time the encoding took

    @property
    def has_negative(self) -> bool:
        return any(role == NEGATIVE for role, _, _ in self.parts)

    @property
    def context(self) -> np.ndarray:
        """The positive cross-attention context, shape (tokens, width)."""
        return self.parts[(POSITIVE, "c_crossattn", 0)]

    def save(self, path: Union[str, Path]) -> Path:
        """Write to ``.npz`` (arrays plus a JSON header); ``Conditioning.load`` reads it back."""
        p = Path(path)
        meta = {"format": _FORMAT, "family": self.family, "encoder": self.encoder, "prompt": self.prompt,
                "negative_prompt": self.negative_prompt, "parts": [list(k) for k in self.parts]}
        arrays = {f"part{i}": a for i, a in enumerate(self.parts.values())}
        with p.open("wb") as f:
            np.savez(f, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
        return p

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Conditioning":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"no such file: {p}")
        try:
            with np.load(p, allow_pickle=False) as z:
                meta = json.loads(bytes(z["__meta__"]).decode())
                if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
                    raise SdcppError(f"{p}: unknown conditioning format "
                                     f"{meta.get('format') if isinstance(meta, dict) else None!r}")
                parts = {(int(k[0]), str(k[1]), int(k[2])): z[f"part{i}"] for i, k in enumerate(meta["parts"])}
                return cls(parts, str(meta["family"]), str(meta["encoder"]), str(meta["prompt"]),
                           meta["negative_prompt"])
        except SdcppError:
            raise
        except (OSError, ValueError, KeyError, TypeError, IndexError, zipfile.BadZipFile) as e:
            raise SdcppError(f"{p}: not a saved Conditioning ({type(e).__name__}: {e})") from None


@dataclass(frozen=True, eq=False)
class Latent:
    """A latent in the diffusion model's space, shape (1, channels, height/f, width/f)."""

    data: np.ndarray
    family: str
    scale: int                          # pixels per latent cell (the VAE factor)
    seed: Optional[int] = None
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return int(self.data.shape[-3])

    @property
    def width(self) -> int:
        return int(self.data.shape[-1]) * self.scale

    @property
    def height(self) -> int:
        return int(self.data.shape[-2]) * self.scale


# -- crossing the FFI ---------------------------------------------------------------------------
class TensorViews:
    """``sdcpp_tensor_t`` views over numpy arrays, alive as long as this object."""

    def __init__(self, items: List[Tuple[PartKey, np.ndarray]]) -> None:
        self.arrays = []
        self.names = []
        self.views = ffi.new("sdcpp_tensor_t[]", max(len(items), 1))
        self.count = len(items)
        for i, ((role, part, index), array) in enumerate(items):
            is_int = array.dtype.kind in "iu"
            a = np.ascontiguousarray(array, dtype=np.int32 if is_int else np.float32)
            if not 1 <= a.ndim <= 5:
                raise InvalidArgumentError(f"{part}: arrays of 1 to 5 dimensions expected, got {a.ndim}")
            name = ffi.new("char[]", part.encode())
            v = self.views[i]
            v.role, v.part, v.index, v.is_int32, v.ndim = role, name, index, int(is_int), a.ndim
            for d, n in enumerate(reversed(a.shape)):
                v.ne[d] = n
            v.data = ffi.from_buffer(a)
            self.arrays.append(a)
            self.names.append(name)

    @property
    def first(self):
        return self.views if self.count else ffi.NULL


def read_result(result) -> List[Tuple[PartKey, np.ndarray]]:
    """Copy every tensor of an ``sdcpp_result_t*`` into numpy, then free it."""
    try:
        out = []
        view = ffi.new("sdcpp_tensor_t*")
        for i in range(lib.sdcpp_result_count(result)):
            if lib.sdcpp_result_get(result, i, view) != 0:
                raise SdcppError(ffi.string(lib.sdcpp_last_error()).decode())
            shape = tuple(reversed([view.ne[d] for d in range(view.ndim)]))
            dtype = np.int32 if view.is_int32 else np.float32
            count = int(np.prod(shape))
            a = np.frombuffer(ffi.buffer(view.data, count * 4), dtype=dtype).reshape(shape).copy()
            out.append(((view.role, ffi.string(view.part).decode(), view.index), a))
        return out
    finally:
        lib.sdcpp_result_free(result)


def check(rc: int, error_type=SdcppError) -> None:
    """Raise the shim's per-thread message when a call failed."""
    if rc != 0:
        message = ffi.string(lib.sdcpp_last_error()).decode() or "native call failed"
        raise (InvalidArgumentError if rc == -2 else error_type)(message)
