"""A pipeline's ControlNet (Z-Image-Turbo Fun ControlNet Union): the file, loaded beside the DiT on
demand and releasable, and the control latent it takes, made once and reused across seeds.

The engine runs the control blocks inside the DiT's graph (``vendor/patches/0016``). What it is
given per generation is a control latent: the control image through the VAE encoder (16
channels); for the 2.x files (33 control channels) with inpainting, followed by ``1 - mask`` at
the latent's size and the latent of the init image with the masked pixels set to gray, as
diffusers' ``ZImageControlNetInpaintPipeline`` builds it (without inpainting the engine fills
those 17 channels with zeros, as diffusers' ControlNet pipeline does).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ._images import ImageLike, as_pil
from .checks import ControlNetInfo, check_controlnet
from .engine import canny
from .errors import IncompatibleModelError, InvalidArgumentError
from .staged import Latent

logger = logging.getLogger("sdcpp_py")

__all__ = ["ControlNetPart", "as_control_image", "canny"]

CONTROL_MODES = ("RGB", "RGBA", "L", "1", "P", "LA")   # PIL modes a control image may come in
MASK_GRAY = 128                                         # a masked pixel: 0 in the VAE's [-1, 1] (127.5)

Encoder = Callable[[Image.Image], Latent]               # an image (at the request's size) to its latent


def as_control_image(image: ImageLike, size: tuple[int, int] | None = None) -> Image.Image:
    """A control image (an edge, depth or pose map, ...) as RGB, of ``size`` (the request's) when given."""
    if isinstance(image, Image.Image) and image.mode not in CONTROL_MODES:
        raise InvalidArgumentError(f"a control image is an RGB, RGBA, gray or palette image, not mode {image.mode}")
    pil = as_pil(image)
    if size is not None and pil.size != tuple(size):
        raise InvalidArgumentError(f"the control image is {pil.width}x{pil.height}, the request {size[0]}x{size[1]}: "
                                   "give a control image of the image's size (or leave width and height out)")
    return pil


class ControlNetPart:
    """One ControlNet file for one engine: checked when given, loaded on first use (and again after
    :meth:`release` or a restarted worker), its control latents made through ``encode``."""

    def __init__(self, engine: Any, path: Path, family: str) -> None:
        self.engine = engine
        self.info: ControlNetInfo = check_controlnet(path, family)
        self.path = path

    @property
    def channels(self) -> int:
        return self.info.channels

    def loaded(self) -> dict[str, str]:
        """The engine's description of the loaded ControlNet ({} when not loaded)."""
        return dict(self.engine.controlnet())

    def ensure(self) -> dict[str, str]:
        """Load the file into the engine unless it is there."""
        info = self.loaded()
        if info:
            return info
        try:
            info = dict(self.engine.load_controlnet(str(self.path)))
        except InvalidArgumentError as e:
            raise IncompatibleModelError(str(e)) from None
        logger.info("ControlNet %s loaded: %s", self.path.name, info)
        return info

    def release(self) -> None:
        """Free its weights (loaded again when a control image next needs them)."""
        if self.loaded():
            self.engine.load_controlnet(None)

    def control_latent(self, encode: Encoder, control: Image.Image, *, mask: Image.Image | None = None,
                       init_image: Image.Image | None = None) -> Latent:
        """The control latent of ``control`` (already at the request's size); with ``mask`` and
        ``init_image`` (same size) and a 33-channel ControlNet, the inpainting channels too."""
        latent = encode(control)
        parts = [latent.data.astype(np.float32)]
        if mask is not None and init_image is not None:
            if self.channels < 16 + 1 + 16:
                logger.warning("%s takes %d control channels: no inpainting channels, the mask guides only the "
                               "sampling", self.path.name, self.channels)
            else:
                keep = np.asarray(mask.convert("L"), dtype=np.uint8) < 128            # binarised as diffusers does
                pixels = np.asarray(init_image.convert("RGB")).copy()
                pixels[~keep] = MASK_GRAY
                masked = encode(Image.fromarray(pixels)).data.astype(np.float32)
                f = latent.scale
                # torch's "nearest" picks pixel (f * i): the top-left one of each cell
                kept = keep[::f, ::f][: masked.shape[-2], : masked.shape[-1]].astype(np.float32)
                parts += [kept[None, None], masked]
        data = np.concatenate(parts, axis=1)
        return Latent(data, latent.family, latent.scale, latent.seed, {"control": True, "controlnet": self.path.name})
