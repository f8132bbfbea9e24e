"""ESRGAN upscaling (RealESRGAN x4plus and its kin), on its own or after a generation.

An :class:`Upscaler` owns one native upscaler context (``new_upscaler_ctx``), resident across
calls; its calls run on the engine thread like every other engine call.
"""

from __future__ import annotations

import weakref
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image

from . import backends
from ._callbacks import capture
from ._engine_thread import ENGINE_THREAD, EngineThread
from ._ffi import ffi, lib
from ._images import ImageLike, as_pil
from ._lib_types import UpscalerCtx
from ._marshal import fill_image, to_pil
from .errors import ClosedError, GenerationError, IncompatibleModelError, InvalidArgumentError, ModelLoadError
from .modelfile import inspect
from .settings import default_threads

MAX_OUTPUT_SIDE = 8192


class Upscaler:
    """An ESRGAN model loaded once: ``upscale(image, repeats=1)`` multiplies the size by its scale
    (4 for RealESRGAN x4plus) per repeat. ``tile_size``: the tiles the image is run in (memory)."""

    def __init__(self, path: str | Path, *, n_threads: int | None = None, tile_size: int = 128,
                 thread: EngineThread = ENGINE_THREAD) -> None:
        self.path = Path(path).expanduser().resolve()
        names = inspect(self.path).tensors
        if "conv_first.weight" in names:
            self.scale = 4 if "conv_up2.weight" in names else 2 if "conv_up1.weight" in names else 1
        elif "model.0.weight" in names:
            top = max(int(n.split(".")[1]) for n in names if n.startswith("model.") and n.split(".")[1].isdigit())
            self.scale = 1 if top <= 4 else 2 if top <= 7 else 4
        else:
            raise IncompatibleModelError(f"{self.path.name}: not an ESRGAN model (no conv_first or model.0 tensors)")
        if isinstance(tile_size, bool) or not isinstance(tile_size, int) or not 16 <= tile_size <= 4096:
            raise InvalidArgumentError(f"tile_size must be an int in [16, 4096], got {tile_size!r}")
        self.n_threads = n_threads or default_threads()
        self.thread = thread
        backends.load()

        def create() -> UpscalerCtx:
            with capture() as log:
                ctx = lib.new_upscaler_ctx(str(self.path).encode(), False, False, self.n_threads, tile_size)
            if ctx == ffi.NULL:
                raise ModelLoadError(f"{self.path.name}: the engine could not load it" +
                                     (f":\n{log.errors()}" if log.errors() else ""))
            return ctx

        self._ctx: UpscalerCtx | None = thread.run(create, discard=lib.free_upscaler_ctx)
        self._finalizer = weakref.finalize(self, thread.post, partial(lib.free_upscaler_ctx, self._ctx))

    def upscale(self, image: ImageLike, repeats: int = 1) -> Image.Image:
        """``image`` upscaled ``repeats`` times by the model's scale."""
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise InvalidArgumentError(f"repeats must be an int >= 1, got {repeats!r}")
        pil = as_pil(image)
        if max(pil.size) * self.scale ** repeats > MAX_OUTPUT_SIDE:
            raise InvalidArgumentError(f"{pil.width}x{pil.height} x{self.scale ** repeats} is over "
                                       f"{MAX_OUTPUT_SIDE} pixels per side")
        for _ in range(repeats):
            pil = self.thread.run(partial(self._upscale, pil))
        return pil

    def _upscale(self, pil: Image.Image) -> Image.Image:
        if self._ctx is None:
            raise ClosedError("this Upscaler is closed")
        image = ffi.new("sd_image_t*")
        keep = fill_image(image[0], pil)
        with capture() as log:
            out: Any = lib.upscale(self._ctx, image[0], self.scale)      # an sd_image_t by value
        del keep
        if out.data == ffi.NULL:
            raise GenerationError("upscaling failed" + (f":\n{log.errors()}" if log.errors() else ""))
        try:
            return to_pil(out)
        finally:
            lib.free(out.data)

    def close(self) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            self._finalizer.detach()
            self.thread.run(lambda: lib.free_upscaler_ctx(ctx))

    def __enter__(self) -> Upscaler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
