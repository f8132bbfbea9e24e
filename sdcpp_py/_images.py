"""Input images: what every face does to them before a generation (one preparation)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InvalidArgumentError

ImageLike = Image.Image | np.ndarray


def as_pil(image: ImageLike) -> Image.Image:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
            raise InvalidArgumentError("image arrays must be uint8 of shape (H, W, 3 or 4)")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or a numpy array, not {type(image).__name__}")
    if not (16 <= image.width <= 4096 and 16 <= image.height <= 4096):
        raise InvalidArgumentError(f"image of {image.width}x{image.height} is out of range")
    return image.convert("RGB")


def open_image(path: str | Path, what: str = "image") -> Image.Image:
    """An image file as RGB (``InvalidArgumentError`` naming ``what`` when it cannot be read)."""
    try:
        with Image.open(path) as im:
            rgb: Image.Image = im.convert("RGB")
            return rgb
    except (OSError, ValueError) as e:
        raise InvalidArgumentError(f"cannot read the {what} {path}: {e}") from None


def size_of(image: ImageLike, max_pixels: int | None = None) -> tuple[int, int]:
    """The generation size an input image implies (sd-cli: its size in multiples of 16), scaled
    down, aspect kept, to at most ``max_pixels``."""
    pil = as_pil(image)
    scale = 1.0 if max_pixels is None else min(1.0, (max_pixels / (pil.width * pil.height)) ** 0.5)
    return max(16, int(pil.width * scale) // 16 * 16), max(16, int(pil.height * scale) // 16 * 16)


def fit_reference(image: ImageLike, width: int, height: int) -> Image.Image:
    """A reference image at the size sd-cli's auto-resize gives it: at most min(1024^2, width *
    height) pixels, sides rounded down to multiples of 16, aspect kept (unchanged if it fits)."""
    pil = as_pil(image)
    w, h = size_of(pil, min(1024 * 1024, width * height))
    return pil if (w, h) == pil.size else pil.resize((w, h), Image.Resampling.LANCZOS)


def prepare(width: int, height: int, init_image: ImageLike | None, ref_images: Sequence[ImageLike],
            fit: bool = True) -> tuple[Image.Image | None, list[Image.Image]]:
    """The init image at the generation's size, the references fitted (sd-cli's auto-resize) unless
    ``fit`` is off."""
    init = as_pil(init_image) if init_image is not None else None
    if init is not None and init.size != (width, height):
        init = init.resize((width, height), Image.Resampling.LANCZOS)
    return init, [fit_reference(r, width, height) if fit else as_pil(r) for r in ref_images]
