"""sdcpp_py: stable-diffusion.cpp in-process, with models that stay loaded.

>>> from sdcpp_py import Pipeline
>>> with Pipeline(diffusion_model="z_image_turbo-Q4_K.gguf", llm="Qwen3-4B.gguf", vae="ae.safetensors") as pipe:
...     pipe.generate("a lighthouse at dawn", seed=42).image.save("out.png")
"""

from __future__ import annotations

from ._callbacks import Preview
from ._version import ENGINE_COMMIT, ENGINE_VERSION, __version__
from .backends import BackendError
from .convert import ConvertResult, convert
from .errors import (
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
from .pipeline import GenerationResult, Pipeline
from .presets import FLUX2_KLEIN_4B, PRESETS, Z_IMAGE_TURBO, Preset, get_preset
from .settings import SAMPLERS, SCHEDULERS, WEIGHT_TYPES, ContextSettings, GenerationSettings
from .staged import Conditioning, Latent
from .system import system_info

__all__ = [
    "__version__", "ENGINE_VERSION", "ENGINE_COMMIT",
    "Pipeline", "GenerationResult", "Conditioning", "Latent", "ContextSettings", "GenerationSettings",
    "Preset", "PRESETS", "Z_IMAGE_TURBO", "FLUX2_KLEIN_4B", "get_preset",
    "SAMPLERS", "SCHEDULERS", "WEIGHT_TYPES", "system_info", "Preview", "convert", "ConvertResult",
    "ImageParameters", "read_parameters",
    "SdcppError", "LibraryError", "ModelLoadError", "ModelNotFoundError", "CorruptModelError",
    "IncompatibleModelError", "InvalidArgumentError", "GenerationError", "ClosedError",
    "ReentrantCallError", "BackendError", "Cancelled", "EngineCrashed",
]
