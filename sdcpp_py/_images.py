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


def open_image(path: str | Path, what: str = "image", mode: str = "RGB") -> Image.Image:
    """An image file as RGB, or ``mode`` (``InvalidArgumentError`` naming ``what`` when it cannot be read)."""
    try:
        with Image.open(path) as im:
            converted: Image.Image = im.convert(mode)
            return converted
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


def as_mask(mask: ImageLike, size: tuple[int, int] | None = None) -> Image.Image:
    """An inpainting mask as a one-channel image: white (255) regenerates, black keeps. Mode L or 1, or
    a 2-D uint8/bool array; of ``size`` (the init image's) when given."""
    if isinstance(mask, np.ndarray):
        if mask.ndim != 2 or mask.dtype not in (np.uint8, np.bool_):
            raise InvalidArgumentError("a mask array is 2-D, uint8 or bool (white/True: regenerate)")
        mask = Image.fromarray(mask.astype(np.uint8) * (255 if mask.dtype == np.bool_ else 1))
    if not isinstance(mask, Image.Image):
        raise TypeError(f"a mask is a PIL image or a numpy array, not {type(mask).__name__}")
    if mask.mode not in ("L", "1"):
        raise InvalidArgumentError(f"a mask is a one-channel image (mode L or 1; white regenerates), not mode "
                                   f"{mask.mode} (an RGBA mask with transparent edit areas: mask_from_alpha())")
    if size is not None and mask.size != size:
        raise InvalidArgumentError(f"the mask is {mask.width}x{mask.height}, the init image {size[0]}x{size[1]}")
    return mask.convert("L")


def mask_from_alpha(image: Image.Image) -> Image.Image:
    """OpenAI's mask (an image whose fully transparent pixels mark what to edit) as our mask."""
    if not isinstance(image, Image.Image) or "A" not in image.getbands():
        raise InvalidArgumentError("the mask must be an image with an alpha channel (transparent: edit)")
    return image.getchannel("A").point(lambda a: 255 if a == 0 else 0)


def prepare(width: int, height: int, init_image: ImageLike | None, ref_images: Sequence[ImageLike],
            fit: bool = True, mask: ImageLike | None = None
            ) -> tuple[Image.Image | None, list[Image.Image], Image.Image | None]:
    """The init image (and its mask) at the generation's size, the references fitted (sd-cli's
    auto-resize) unless ``fit`` is off."""
    init = as_pil(init_image) if init_image is not None else None
    if mask is not None and init is None:
        raise InvalidArgumentError("a mask needs an init image: it marks what of it to regenerate")
    pil_mask = as_mask(mask, init.size) if mask is not None and init is not None else None
    if init is not None and init.size != (width, height):
        init = init.resize((width, height), Image.Resampling.LANCZOS)
        pil_mask = pil_mask.resize((width, height), Image.Resampling.NEAREST) if pil_mask is not None else None
    return init, [fit_reference(r, width, height) if fit else as_pil(r) for r in ref_images], pil_mask
