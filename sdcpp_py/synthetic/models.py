"""Public API: write synthetic model sets (DiT + text encoder + VAE) that the engine loads.

A model set has the exact tensor layout of a real family (``size="full"``) or a tiny one
that runs in seconds (``size="tiny"``), filled with random weights. Files are named after
what they hold (family, size, component, type, seed), so one cache folder can hold many
sets, and a complete file is reused instead of being written again.

>>> from sdcpp_py.synthetic import write_model_set
>>> ms = write_model_set("flux2-klein", "/tmp/models")            # doctest: +SKIP
>>> ms.diffusion_model.name                                       # doctest: +SKIP
'flux2-klein-tiny-dit-f16-s0.gguf'
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .dtypes import check_format, check_weight_type
from .layouts import COMPONENTS, FAMILIES, SIZES, TensorSpec, component_layout, family_config
from .writer import MetaValue, PlannedTensor, file_size, plan_tensors, write_file

__all__ = [
    "SyntheticModelSet",
    "write_model_set",
    "write_component",
    "component_filename",
    "component_specs",
]

log = logging.getLogger("sdcpp_py.synthetic")

_EXT = {"gguf": "gguf", "safetensors": "safetensors"}

# What each component of each family is, for file names and GGUF general.architecture.
# The text encoder is Qwen3 for both families, with one configuration per size, so both
# families share the same LLM file; the VAE is FLUX.1's for Z-Image and FLUX.2's for Klein.
_MODEL_ID = {
    ("z-image-turbo", "dit"): ("z-image-turbo", "z_image"),
    ("flux2-klein", "dit"): ("flux2-klein", "flux2"),
    ("z-image-turbo", "llm"): ("qwen3", "qwen3"),
    ("flux2-klein", "llm"): ("qwen3", "qwen3"),
    ("z-image-turbo", "vae"): ("flux1", "flux_vae"),
    ("flux2-klein", "vae"): ("flux2", "flux2_vae"),
}


@dataclass(frozen=True)
class SyntheticModelSet:
    """Paths of the three files of a synthetic model set."""

    family: str  # "z-image-turbo" | "flux2-klein"
    size: str  # "tiny" | "full"
    diffusion_model: Path
    llm: Path
    vae: Path


def _check_choice(what: str, value: object, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")
    return value


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return seed


def component_specs(family: str, component: str, *, size: str = "tiny", fmt: str = "gguf") -> list[TensorSpec]:
    """Tensor layout of one component; the LLM uses llama.cpp names in GGUF, HF names in safetensors."""
    fmt = check_format(fmt)
    return component_layout(family, component, size, llm_names="gguf" if fmt == "gguf" else "hf")


def component_filename(family: str, component: str, *, size: str = "tiny", seed: int = 0,
                       wtype: str = "f16", fmt: str = "gguf") -> str:
    """File name of a component, e.g. ``z-image-turbo-tiny-dit-q8_0-s0.gguf``,
    ``qwen3-tiny-llm-f16-s0.gguf``, ``flux2-tiny-vae-f16-s0.safetensors``."""
    _check_choice("family", family, FAMILIES)
    _check_choice("component", component, COMPONENTS)
    _check_choice("size", size, SIZES)
    seed = _check_seed(seed)
    fmt = check_format(fmt)
    wtype = check_weight_type(wtype, fmt)
    prefix, _ = _MODEL_ID[(family, component)]
    return f"{prefix}-{size}-{component}-{wtype}-s{seed}.{_EXT[fmt]}"


def _metadata(family: str, component: str, size: str, seed: int, wtype: str) -> dict[str, MetaValue]:
    prefix, arch = _MODEL_ID[(family, component)]
    # Family-independent for shared components (the LLM), so both families' files are equal.
    return {
        "general.architecture": arch,
        "general.type": "model",
        "general.name": f"synthetic {prefix} {component} ({size})",
        "general.description": "random weights with a real layout, written by sdcpp_py.synthetic",
        "sdcpp_py.synthetic.model": f"{prefix}-{component}",
        "sdcpp_py.synthetic.size": size,
        "sdcpp_py.synthetic.seed": seed,
        "sdcpp_py.synthetic.weight_type": wtype,
    }


def write_component(family: str, component: str, out_dir: str | Path, *, size: str = "tiny", seed: int = 0,
                    wtype: str = "f16", fmt: str = "gguf", overwrite: bool = False) -> Path:
    """Write one component ("dit" | "llm" | "vae") of a synthetic model set into ``out_dir``.

    An existing file of the right name and size is reused unless ``overwrite``. Files are
    written to a temporary name and renamed when complete. Returns the file's path.

    Raises ValueError for an unknown family, component, size, type or format, or a
    quantised type with ``fmt="safetensors"``.
    """
    name = component_filename(family, component, size=size, seed=seed, wtype=wtype, fmt=fmt)
    fmt = check_format(fmt)
    wtype = check_weight_type(wtype, fmt)
    family_config(family, size)  # validates the configuration
    planned: list[PlannedTensor] = plan_tensors(component_specs(family, component, size=size, fmt=fmt), wtype, fmt)
    metadata = _metadata(family, component, size, seed, wtype)
    path = Path(out_dir) / name
    expected = file_size(planned, metadata, fmt)
    if path.exists() and not overwrite:
        actual = path.stat().st_size
        if actual == expected:
            log.debug("reusing %s", path)
            return path
        log.warning("%s has %d bytes, expected %d: writing it again", path, actual, expected)
    size_written = write_file(path, planned, seed=seed, metadata=metadata, fmt=fmt)
    if size_written != expected:  # pragma: no cover - internal consistency check
        raise RuntimeError(f"{path}: wrote {size_written} bytes, expected {expected}")
    return path


def write_model_set(family: str, out_dir: str | Path, *, size: str = "tiny", seed: int = 0,
                    dit_type: str = "f16", llm_type: str = "f16", vae_type: str = "f16",
                    fmt: str = "gguf", overwrite: bool = False) -> SyntheticModelSet:
    """Write (or reuse) the DiT, text encoder and VAE of a synthetic ``family`` model set.

    family: "z-image-turbo" (Z-Image DiT, Qwen3, FLUX.1 VAE) or "flux2-klein" (FLUX.2 Klein
    DiT, Qwen3, FLUX.2 VAE). size: "tiny" (runs in seconds) or "full" (the real layouts:
    GBs, minutes). Types: f32, f16, bf16 and, in GGUF only, q8_0, q5_1, q5_0, q4_1, q4_0,
    q6_k, q4_k, iq4_nl (they apply to Linear and embedding weights; convs are F16 and
    norms/biases F32; a Linear narrower than the type's block, and an embedding of a type the
    engine would widen, is F16).
    fmt: "gguf" or "safetensors" for all three files (the LLM gets llama.cpp names in GGUF,
    Hugging Face names in safetensors). Both families use the same Qwen3 configuration at a
    given size, so their LLM file (``qwen3-<size>-llm-...``) is one shared file.

    Raises ValueError, before writing anything, for an unknown family, size, type or
    format, a quantised type in safetensors, or a negative seed.
    """
    _check_choice("family", family, FAMILIES)
    _check_choice("size", size, SIZES)
    _check_seed(seed)
    fmt = check_format(fmt)
    types = {c: check_weight_type(t, fmt) for c, t in (("dit", dit_type), ("llm", llm_type), ("vae", vae_type))}
    out = Path(out_dir)
    paths = {c: write_component(family, c, out, size=size, seed=seed, wtype=types[c], fmt=fmt, overwrite=overwrite)
             for c in COMPONENTS}
    return SyntheticModelSet(family=family, size=size, diffusion_model=paths["dit"], llm=paths["llm"], vae=paths["vae"])
