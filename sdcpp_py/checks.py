"""Checks of what staged calls are given, made before the engine sees it.

stable-diffusion.cpp asserts (and so aborts the process) on many shapes it does
not expect: a conditioning of the wrong width or rank, an odd-sized reference
latent, a schedule that divides by zero. Each check here raises a Python
exception for one such input instead.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._images import ImageLike, as_pil
from .errors import IncompatibleModelError, InvalidArgumentError
from .families import FLUX2_DEV, FLUX2_KLEIN, Z_IMAGE
from .modelfile import inspect
from .settings import MAX_PIXELS, GenerationSettings
from .staged import NEGATIVE, POSITIVE, Conditioning, Latent

MAX_TOKENS = 16384                       # text tokens per conditioning part
_LLM_PARTS = ("c_crossattn", "extra_c_crossattn")   # what the Qwen3 conditioners produce
# Schedulers whose sigma formula needs at least two steps (one step divides by zero
# or, for gits, reads before its table).
_TWO_STEP_SCHEDULERS = ("exponential", "karras", "gits")
_FLOW_FAMILIES = (Z_IMAGE, FLUX2_KLEIN, FLUX2_DEV)


def check_taesd(path: Path | None) -> Path:
    """A tiny autoencoder file (TAESD/TAEF1/TAEF2): readable and holding a TAE decoder."""
    if path is None:
        raise TypeError("taesd must be a path")
    f = inspect(path)
    if f.count_blocks("decoder.layers.") == 0:
        raise IncompatibleModelError(f"{path}: not a tiny autoencoder (no decoder.layers.N tensors)")
    return path


@dataclass(frozen=True)
class ControlNetInfo:
    """A ControlNet Union file's sizes, from its header."""

    path: Path
    channels: int      # control channels: 16 (1.0: the control latent) or 33 (2.x: + mask, inpaint latent)
    width: int         # the DiT width it was made for
    layers: int        # control blocks


def check_controlnet(path: Path, family: str) -> ControlNetInfo:
    """A Z-Image-Turbo Fun ControlNet Union file (safetensors or GGUF, diffusers' tensor names) for
    a Z-Image pipeline; the engine checks it against the DiT's sizes when it loads it."""
    f = inspect(path)
    embedder = f.tensors.get("control_all_x_embedder.2-1.weight")
    if embedder is None or len(embedder.shape) != 2 or f.count_blocks("control_layers.") == 0:
        what = "a ControlNet of another family (SD's control_model)" if f.find("input_hint_block.0.weight") else \
            "not a ControlNet Union file"
        raise IncompatibleModelError(f"{path}: {what}; a Z-Image ControlNet Union holds "
                                     "control_all_x_embedder.2-1.weight and control_layers.N")
    if family != Z_IMAGE:
        raise IncompatibleModelError(f"{path}: a Z-Image ControlNet Union runs beside a Z-Image DiT; this "
                                     f"pipeline's model is {family}")
    width, patch_channels = embedder.shape
    if patch_channels % 4:
        raise IncompatibleModelError(f"{path}: control_all_x_embedder.2-1.weight is {embedder.shape}, not "
                                     "(width, 4 x control channels)")
    return ControlNetInfo(path, patch_channels // 4, width, f.count_blocks("control_layers."))


def check_control_latent(control: Latent, s: GenerationSettings, channels: int, with_refs: bool) -> None:
    """A control latent (``Pipeline.encode_control``) for a request of this size and a ControlNet
    taking ``channels`` control channels."""
    if not isinstance(control, Latent):
        raise TypeError(f"control must be a Latent (Pipeline.encode_control), not {type(control).__name__}")
    data = control.data
    if data.ndim != 4 or data.shape[0] != 1 or not 1 <= data.shape[1] <= channels or data.dtype.kind != "f":
        raise InvalidArgumentError(f"a control latent is a float array (1, C <= {channels}, h, w), not "
                                   f"{data.dtype} {tuple(data.shape)}")
    if (control.width, control.height) != (s.width, s.height):
        raise InvalidArgumentError(f"the control latent is for {control.width}x{control.height}, the request "
                                   f"{s.width}x{s.height}")
    if not np.isfinite(data).all():
        raise InvalidArgumentError("the control latent holds NaN or infinite values")
    if with_refs:
        raise InvalidArgumentError("the Z-Image ControlNet does not run with reference images")


@dataclass(frozen=True)
class LoraInfo:
    """What a LoRA file changes: the text encoder, the diffusion model (or both)."""

    path: Path
    encoder: bool
    diffusion: bool


_LORA_PARTS = re.compile(r"(lora_[AB]|lora_down|lora_up|lora\.down|lora\.up|\.alpha$|hada_w|lokr_w|\.diff$)")
_ENCODER_NAMES = ("lora_te", "te.", "te1", "te_", "text_encoder", "text_encoders", "cond_stage_model")
_FLUX_NAMES = re.compile(r"(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)[._]\d")
_ZIMAGE_NAMES = re.compile(r"(^|[._])(layers|noise_refiner|context_refiner)[._]\d+[._](attention|feed_forward)")


def check_lora(path: Path, family: str) -> LoraInfo:
    """A LoRA file this family's engine can apply: readable, holding LoRA tensors, made for this
    family's DiT (a FLUX-shaped LoRA on Z-Image, or the reverse, would apply to nothing)."""
    f = inspect(path)
    names = [n for n in f.tensors if _LORA_PARTS.search(n)]
    if not names:
        raise IncompatibleModelError(f"{path.name}: not a LoRA (no lora_A/lora_B, lora_down/lora_up tensors)")
    bare = [n.removeprefix("lora.").removeprefix("lora_") for n in names]
    encoder = any(n.startswith(_ENCODER_NAMES) for n in bare)
    diffusion = [n for n in bare if not n.startswith(_ENCODER_NAMES)]
    flux, zimage = any(_FLUX_NAMES.search(n) for n in diffusion), any(_ZIMAGE_NAMES.search(n) for n in diffusion)
    other = "FLUX" if flux and not zimage else "Z-Image" if zimage and not flux else None
    if other is not None and (other == "FLUX") != (family != Z_IMAGE):
        raise IncompatibleModelError(f"{path.name}: a LoRA for a {other} model; this pipeline is {family}")
    return LoraInfo(path, encoder, bool(diffusion))


def check_schedule(s: GenerationSettings, family: str) -> None:
    if s.sigmas is not None:
        return  # a custom schedule replaces the scheduler
    if s.scheduler in _TWO_STEP_SCHEDULERS and s.steps < 2:
        raise InvalidArgumentError(f"the {s.scheduler} scheduler needs at least 2 steps")
    if s.scheduler == "ays" and family in _FLOW_FAMILIES:
        raise InvalidArgumentError(f"the ays scheduler has noise levels for SD 1.x, SDXL and SVD only, not {family}")


def check_ref_images(images: Sequence[ImageLike]) -> None:
    """Reference images are VAE-encoded at their own size: sides must be multiples of 16."""
    for i, image in enumerate(images):
        pil = as_pil(image)
        if pil.width % 16 or pil.height % 16:
            raise InvalidArgumentError(f"reference image {i} is {pil.width}x{pil.height}: both sides must be "
                                       "multiples of 16 (resize or crop it first)")


def check_conditioning(c: Conditioning, family: str, context_dim: int | None) -> None:
    """A conditioning this model can take: made for its family, every part a float
    array of shape (tokens, width) or (1, tokens, width) with the DiT's text width."""
    if not isinstance(c, Conditioning):
        raise TypeError(f"expected a Conditioning, not {type(c).__name__}")
    if c.family != family:
        raise IncompatibleModelError(f"this conditioning was made for {c.family}, not {family}")
    if (POSITIVE, "c_crossattn", 0) not in c.parts:
        raise InvalidArgumentError("the conditioning has no positive c_crossattn part")
    llm_family = family in (Z_IMAGE, FLUX2_KLEIN)
    for key, array in c.parts.items():
        if not (isinstance(key, tuple) and len(key) == 3):
            raise InvalidArgumentError(f"conditioning part key {key!r} is not (role, name, index)")
        role, name, index = key
        if role not in (POSITIVE, NEGATIVE) or not isinstance(index, int) or not 0 <= index <= 64:
            raise InvalidArgumentError(f"conditioning part {key!r}: role must be 0 or 1, index 0..64")
        if llm_family and name not in _LLM_PARTS:
            raise InvalidArgumentError(f"conditioning part {name!r} is not one {family} uses "
                                       f"({', '.join(_LLM_PARTS)})")
        if not isinstance(array, np.ndarray) or array.dtype.kind != "f":
            raise InvalidArgumentError(f"conditioning part {name!r} must be a float numpy array")
        if not np.isfinite(array).all():
            raise InvalidArgumentError(f"conditioning part {name!r} holds NaN or infinite values")
        if not llm_family:
            continue
        shape = array.shape
        if array.ndim not in (2, 3) or (array.ndim == 3 and shape[0] != 1):
            raise InvalidArgumentError(f"conditioning part {name!r} has shape {shape}; "
                                       "(tokens, width) or (1, tokens, width) expected")
        if not 1 <= shape[-2] <= MAX_TOKENS:
            raise InvalidArgumentError(f"conditioning part {name!r} has {shape[-2]} tokens (1..{MAX_TOKENS})")
        if context_dim is not None and shape[-1] != context_dim:
            raise IncompatibleModelError(f"conditioning width {shape[-1]} does not fit this model ({context_dim})")


def check_latent(latent: Latent, family: str) -> None:
    """A latent of this family, shaped (1, C, h, w), covering 16-pixel multiples (the
    library checks the channel count against the model)."""
    if not isinstance(latent, Latent):
        raise TypeError(f"expected a Latent, not {type(latent).__name__}")
    if latent.family != family:
        raise IncompatibleModelError(f"this latent belongs to {latent.family}, not {family}")
    d = latent.data
    if not isinstance(d, np.ndarray) or d.dtype.kind != "f":
        raise InvalidArgumentError("latent data must be a float numpy array")
    if d.ndim != 4 or d.shape[0] != 1 or d.shape[-1] < 1 or d.shape[-2] < 1:
        raise InvalidArgumentError(f"latent data must have shape (1, C, h, w), got {d.shape}")
    if not np.isfinite(d).all():
        raise InvalidArgumentError("latent data holds NaN or infinite values")
    if latent.width % 16 or latent.height % 16 or latent.width * latent.height > MAX_PIXELS:
        raise InvalidArgumentError(f"latent of {latent.width}x{latent.height} pixels is out of range")
