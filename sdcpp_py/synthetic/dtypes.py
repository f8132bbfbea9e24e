"""ggml tensor types the synthetic writer emits, and which type each tensor is stored in.

The storage rules follow what stable-diffusion.cpp does with each kind of tensor
(``ggml_extend.hpp``): Linear weights keep the file's type unless their input width is not
a multiple of the type's block (then the engine uses F32), conv weights are always F16 in
memory, embeddings keep F16/Q8_0/Q5_x/Q4_x (others become F32), norms, biases and
learned vectors are F32. Storing a tensor in the type the engine will use anyway keeps
files honest and loading free of conversions.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..modelfile import GGML_TYPES as ALL_GGML_TYPES
from .layouts import TensorSpec

__all__ = [
    "GGMLType",
    "GGML_TYPES",
    "WEIGHT_TYPES",
    "FORMATS",
    "FLOAT_TYPES",
    "QUANT_TYPES",
    "ggml_type",
    "check_weight_type",
    "check_format",
    "storage_type",
]


@dataclass(frozen=True)
class GGMLType:
    """One ggml tensor type: its id in GGUF, block size (elements) and block size in bytes."""

    name: str
    ggml_id: int
    block_size: int
    type_size: int
    safetensors_dtype: str | None = None

    @property
    def quantized(self) -> bool:
        """True for block-quantised types."""
        return self.block_size > 1

    def nbytes(self, numel: int) -> int:
        """Bytes of ``numel`` elements (``numel`` must be a multiple of the block size)."""
        if numel % self.block_size:
            raise ValueError(f"{numel} elements is not a multiple of the {self.name} block size {self.block_size}")
        return numel // self.block_size * self.type_size


def _from_ggml(name: str, safetensors_dtype: str | None = None) -> GGMLType:
    """A type as the GGUF reader's table (sdcpp_py.modelfile) knows it: id, block, bytes."""
    (gid, (_, block, size)), = [(i, t) for i, t in ALL_GGML_TYPES.items() if t[0].lower() == name]
    return GGMLType(name, gid, block, size, safetensors_dtype)


GGML_TYPES: dict[str, GGMLType] = {
    "f32": _from_ggml("f32", "F32"),
    "f16": _from_ggml("f16", "F16"),
    "bf16": _from_ggml("bf16", "BF16"),
    **{name: _from_ggml(name) for name in ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "q6_k", "q4_k", "iq4_nl")},
}

FLOAT_TYPES: tuple[str, ...] = ("f32", "f16", "bf16")
QUANT_TYPES: tuple[str, ...] = ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "q6_k", "q4_k", "iq4_nl")
WEIGHT_TYPES: tuple[str, ...] = FLOAT_TYPES + QUANT_TYPES
FORMATS: tuple[str, ...] = ("gguf", "safetensors")

# Embedding types the engine keeps for get_rows (support_get_rows in ggml_extend.hpp).
_EMB_KEEP = frozenset({"f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"})


def ggml_type(name: str) -> GGMLType:
    """Look a type up by name ("f16", "q8_0", ...)."""
    try:
        return GGML_TYPES[name]
    except KeyError:
        raise ValueError(f"unknown tensor type {name!r}; allowed: {', '.join(WEIGHT_TYPES)}") from None


def check_format(fmt: str) -> str:
    """Validate a container format name; returns it lower-cased."""
    f = fmt.lower() if isinstance(fmt, str) else fmt
    if f not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
    return f


def check_weight_type(wtype: str, fmt: str = "gguf") -> str:
    """Validate a requested weight type for a container format; returns it lower-cased."""
    fmt = check_format(fmt)
    t = wtype.lower() if isinstance(wtype, str) else wtype
    allowed = WEIGHT_TYPES if fmt == "gguf" else FLOAT_TYPES
    if t not in allowed:
        raise ValueError(f"unknown or unsupported {fmt} weight type {wtype!r}; allowed: {', '.join(allowed)}")
    return t


def storage_type(spec: TensorSpec, wtype: str) -> GGMLType:
    """The type ``spec`` is stored in when ``wtype`` is requested for the weights.

    - ``w``: the requested type; a quantised type whose block does not divide the input
      width falls back to F16 (the engine would hold such a Linear in F32 anyway).
    - ``emb``: as ``w`` when the engine keeps the type for ``get_rows``; a requested F32
      or BF16 is honoured too (the engine converts BF16 to F32 at load).
    - ``conv``: F16, whatever was requested (the engine holds convs in F16).
    - ``norm``, ``bias``, ``vec``, ``f32w``, ``bn_mean``, ``bn_var``: F32.
    """
    req = ggml_type(wtype)
    kind = spec.kind
    if kind in ("w", "emb"):
        if kind == "emb" and req.quantized and req.name not in _EMB_KEEP:
            return GGML_TYPES["f16"]
        if req.quantized and (len(spec.shape) < 2 or spec.row_width % req.block_size):
            return GGML_TYPES["f16"]
        return req
    if kind == "conv":
        return GGML_TYPES["f16"]
    return GGML_TYPES["f32"]
