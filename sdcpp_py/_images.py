"""PIL images and numpy arrays to and from the engine's ``sd_image_t``."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ._ffi import ffi
from ._lib_types import CStruct
from .errors import GenerationError, InvalidArgumentError

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


def fill_image(struct: CStruct, image: ImageLike) -> tuple[np.ndarray, CStruct]:
    """Point an ``sd_image_t`` at an RGB copy of ``image``; returns what must stay alive."""
    rgb = np.ascontiguousarray(np.asarray(as_pil(image)), dtype=np.uint8)
    buf = ffi.from_buffer(rgb)
    struct.width, struct.height, struct.channel = rgb.shape[1], rgb.shape[0], 3
    struct.data = ffi.cast("uint8_t*", buf)
    return (rgb, buf)


def to_pil(img: CStruct) -> Image.Image:
    w, h, c = img.width, img.height, img.channel
    if img.data == ffi.NULL or c not in (1, 3, 4):
        raise GenerationError(f"engine returned an empty image ({w}x{h}x{c})")
    arr = np.frombuffer(ffi.buffer(img.data, w * h * c), dtype=np.uint8).reshape(h, w, c).copy()
    return Image.fromarray(arr[:, :, 0] if c == 1 else arr)
