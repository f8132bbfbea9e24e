"""sdcpp_py: stable-diffusion.cpp in-process, with models that stay loaded.

>>> from sdcpp_py import Pipeline
>>> with Pipeline(diffusion_model="z_image_turbo-Q4_K.gguf", llm="Qwen3-4B.gguf", vae="ae.safetensors") as pipe:
...     pipe.generate("a lighthouse at dawn", seed=42).image.save("out.png")

The names that drive the engine (``Pipeline``, ``convert``, ``system_info``) load the native
library when first used; the rest (settings, presets, metadata, grids, the synthetic writer)
import without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import ENGINE_COMMIT, ENGINE_VERSION, __version__
from .errors import (
                     BackendError,
                     Cancelled,
                     ClosedError,
                     CorruptModelError,
                     EngineCrashed,
                     GenerationError,
                     IncompatibleModelError,
                     InvalidArgumentError,
                     LibraryError,
                     ModelLoadError,
                     ModelNotFoundError,
                     ReentrantCallError,
                     SdcppError,
)
from .metadata import ImageParameters, read_parameters
from .presets import FLUX2_KLEIN_4B, PRESETS, Z_IMAGE_TURBO, Preset, get_preset
from .settings import SAMPLERS, SCHEDULERS, WEIGHT_TYPES, ContextSettings, GenerationSettings, Preview
from .staged import Conditioning, GenerationResult, Latent

if TYPE_CHECKING:
    from .convert import ConvertResult, convert
    from .pipeline import Pipeline
    from .system import system_info
    from .upscaler import Upscaler

_NATIVE = {"Pipeline": ".pipeline", "convert": ".convert", "ConvertResult": ".convert", "system_info": ".system",
           "Upscaler": ".upscaler"}


def __getattr__(name: str) -> Any:
    """The names that need the native library, imported on first use."""
    if name in _NATIVE:
        return getattr(importlib.import_module(_NATIVE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "__version__", "ENGINE_VERSION", "ENGINE_COMMIT",
    "Pipeline", "GenerationResult", "Conditioning", "Latent", "ContextSettings", "GenerationSettings",
    "Preset", "PRESETS", "Z_IMAGE_TURBO", "FLUX2_KLEIN_4B", "get_preset",
    "SAMPLERS", "SCHEDULERS", "WEIGHT_TYPES", "system_info", "Preview", "convert", "ConvertResult",
    "ImageParameters", "read_parameters", "Upscaler",
    "SdcppError", "LibraryError", "ModelLoadError", "ModelNotFoundError", "CorruptModelError",
    "IncompatibleModelError", "InvalidArgumentError", "GenerationError", "ClosedError",
    "ReentrantCallError", "BackendError", "Cancelled", "EngineCrashed",
]
