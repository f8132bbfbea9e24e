"""Synthetic models: real stable-diffusion.cpp tensor layouts filled with random weights.

No model hub is reachable from the test and benchmark machines, so tests and benchmarks
write their own models: the exact layouts of Z-Image-Turbo and FLUX.2 Klein (DiT, Qwen3
text encoder, VAE) at full size, or tiny versions the engine runs in seconds.

>>> from sdcpp_py.synthetic import write_model_set
>>> ms = write_model_set("z-image-turbo", "/tmp/models", size="tiny", dit_type="q8_0")  # doctest: +SKIP

Command line: ``python -m sdcpp_py.synthetic --family flux2-klein --size tiny --out DIR``.
Only numpy and the standard library are used.
"""

from __future__ import annotations

from .controlnet import CONTROLNET_VARIANTS, control_channels, control_places, controlnet_layout, write_controlnet
from .dtypes import FORMATS, WEIGHT_TYPES
from .esrgan import write_esrgan
from .layouts import COMPONENTS, FAMILIES, SIZES, TensorSpec, component_layout, total_params
from .lora import LORA_LAYOUTS, write_lora
from .models import SyntheticModelSet, component_filename, component_specs, write_component, write_model_set

__all__ = [
    "SyntheticModelSet",
    "write_model_set",
    "write_lora",
    "write_esrgan",
    "write_controlnet",
    "controlnet_layout",
    "control_channels",
    "control_places",
    "CONTROLNET_VARIANTS",
    "LORA_LAYOUTS",
    "write_component",
    "component_filename",
    "component_specs",
    "component_layout",
    "total_params",
    "TensorSpec",
    "FAMILIES",
    "SIZES",
    "COMPONENTS",
    "WEIGHT_TYPES",
    "FORMATS",
]
