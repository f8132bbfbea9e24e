"""The Engine: the one owner of a native context.

It holds the handle, cancellation, residency (release and reload of the text
encoder and the diffusion model, one text encoder shared by several contexts) and
the marshalling of tensors and images across the FFI. Every method is one
*hold*: it runs as one call on the engine thread (``_engine_thread``), so the
residency checks an engine call depends on and the call itself can never be
separated by another thread's release or close. The Engine knows no Pipeline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from ._callbacks import Preview, ProgressFn, capture, preview_scope, progress_scope
from ._engine_thread import ENGINE_THREAD, CancelToken, EngineThread, Operation, Owner
from ._ffi import ffi, lib, string
from ._images import to_pil
from ._lib_types import CData, SdCtx
from ._marshal import PartKey, TensorViews, check, read_result
from .errors import ClosedError, GenerationError, ModelLoadError, SdcppError
from .residency import COMPONENT_FILE, COMPONENT_NAME, DIFFUSION, ENCODER, ContextHandle, file_stamp

logger = logging.getLogger("sdcpp_py")
Parts = list[tuple[PartKey, np.ndarray]]
T = TypeVar("T")


class Engine(Owner):
    """A native context and everything that touches it.

    ``paths`` are the files the context is made from (reloads read them again);
    ``release_encoder``: free the text encoder after each encoding;
    ``release_diffusion``: free the diffusion model before each encoding.
    """

    def __init__(self, paths: dict[str, Path | None], *, release_encoder: bool = False,
                 release_diffusion: bool = False, thread: EngineThread = ENGINE_THREAD) -> None:
        super().__init__()
        self.paths = paths
        self.release_encoder_after = release_encoder
        self.release_diffusion_before = release_diffusion
        self.stamps = {ENCODER: file_stamp(paths.get("llm")), DIFFUSION: file_stamp(paths.get("diffusion_model"))}
        self.thread = thread
        self.handle: ContextHandle | None = None
        self.load_seconds = 0.0

    # -- running ---------------------------------------------------------------------------
    def run(self, fn: Callable[[SdCtx], T], *, token: CancelToken | None = None,
            discard: Callable[[T], None] | None = None) -> T:
        """``fn(ctx)`` on the engine thread, this engine's context open (one hold)."""
        return self.thread.run(lambda: fn(self._ptr()), owner=self, token=token, discard=discard)

    def operation(self, token: CancelToken | None = None) -> AbstractContextManager[Operation]:
        """Make the calls in the block one operation: cancel() stops all of them."""
        return self.thread.operation(self, token)

    def cancel(self) -> None:
        """Stop this engine's calls begun so far (from any thread)."""
        self.thread.cancel(self)

    def _ptr(self) -> SdCtx:
        ptr = None if self.handle is None else self.handle.ptr
        if ptr is None:
            raise ClosedError("this Pipeline is closed")
        return ptr

    def _native(self, fn: Callable[..., int], *args: Any, progress: ProgressFn | None = None,
                preview: Preview | None = None, error: type[SdcppError] = GenerationError,
                cleanup: Callable[[], None] | None = None) -> float:
        """One shim call (on the engine thread), progress routed; returns its seconds.

        A progress callback that raises stops the call (the engine's abort flag); what
        the call returned anyway is freed by ``cleanup`` and the callback's exception raised."""
        start = time.perf_counter()
        with progress_scope(progress) as state, preview_scope(preview):
            rc = fn(self._ptr(), *args)
        if state.error is not None:
            if rc == 0 and cleanup is not None:
                cleanup()
            state.raise_error()
        check(rc, error)
        return time.perf_counter() - start

    # -- lifecycle -------------------------------------------------------------------------
    def open(self, params: CData, keep: list[Any], *, defer_mask: int, device: str, weight_buffers: str) -> None:
        """Create the context (``keep``: what ``params`` points into)."""
        def create() -> tuple[SdCtx, float]:
            start = time.perf_counter()
            with capture() as log, progress_scope(None):
                ctx = lib.sdcpp_new_ctx(params, defer_mask, device.encode(), weight_buffers.encode())
            if ctx == ffi.NULL:
                message = string(lib.sdcpp_last_error())
                raise ModelLoadError("stable-diffusion.cpp could not create a context"
                                     + (f":\n{log.errors() or message}" if (log.errors() or message) else ""))
            del keep[:]
            return ctx, time.perf_counter() - start

        ctx, self.load_seconds = self.thread.run(create, owner=self, discard=lambda r: lib.sdcpp_free_ctx(r[0]))
        self.handle = ContextHandle(ctx)

    @property
    def closed(self) -> bool:
        return self.handle is None or self.handle.ptr is None

    def close(self) -> None:
        """Free the context once the calls queued before have run (their callers wait for them)."""
        handle = self.handle
        if handle is not None and handle.ptr is not None:
            self.thread.run(lambda: handle.free())

    def close_later(self) -> None:
        """Free the context on the engine thread without waiting (finalizers: any thread, no lock)."""
        handle = self.handle
        if handle is not None and handle.ptr is not None:
            self.thread.post(handle.free)

    # -- residency -------------------------------------------------------------------------
    def loaded(self, component: int) -> bool:
        return bool(self.run(lambda ctx: lib.sdcpp_component_loaded(ctx, component)))

    def weight_bytes(self) -> dict[str, int]:
        return self.run(lambda ctx: {"encoder": int(lib.sdcpp_component_bytes(ctx, ENCODER)),
                                     "diffusion": int(lib.sdcpp_component_bytes(ctx, DIFFUSION))})

    def all_buffers(self) -> dict[str, str]:
        """Per component, ``"CPU=..,CPU_REPACK=.."``: its resident bytes per buffer ("" released)."""
        return self.run(self._buffers)

    @staticmethod
    def _buffers(ctx: SdCtx) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, component in (("diffusion", DIFFUSION), ("encoder", ENCODER)):
            text = ffi.new("char[]", 1024)
            check(lib.sdcpp_component_buffers(ctx, component, text, 1024))
            out[name] = ffi.string(text).decode()
        return out

    def release(self, component: int) -> None:
        self.run(lambda ctx: self._release(ctx, component))

    def _release(self, ctx: SdCtx, component: int) -> None:
        if lib.sdcpp_component_loaded(ctx, component):
            self._native(lib.sdcpp_component_release, component, error=ModelLoadError)

    def _ensure(self, ctx: SdCtx, component: int) -> None:
        if lib.sdcpp_component_loaded(ctx, component):
            return
        path = self.paths.get(COMPONENT_FILE[component])
        if path is None or not path.is_file():
            raise ModelLoadError(f"cannot reload the {COMPONENT_NAME[component]}: {path} is gone")
        if file_stamp(path) != self.stamps.get(component):
            raise ModelLoadError(f"cannot reload the {COMPONENT_NAME[component]}: {path} changed since the "
                                 "pipeline was created (make a new Pipeline for the new file)")
        self.thread.check_cancelled()
        self._native(lib.sdcpp_component_reload, component, ffi.new("char[]", str(path).encode()),
                     error=ModelLoadError)

    def _before_encoding(self, ctx: SdCtx) -> None:
        if self.release_diffusion_before:
            self._release(ctx, DIFFUSION)
        self._ensure(ctx, ENCODER)

    def _after_encoding(self, ctx: SdCtx) -> None:
        if self.release_encoder_after:
            self._release(ctx, ENCODER)

    def borrow_encoder(self, owner: Engine) -> None:
        """Use ``owner``'s text encoder (this context's own is freed): one copy for both."""
        def share(ctx: SdCtx) -> None:
            check(lib.sdcpp_share_encoder(owner._ptr(), ctx), ModelLoadError)
            if self.handle is not None and owner.handle is not None:   # both open: _ptr() checked
                self.handle.join(owner.handle)
        self.run(share)

    @property
    def sharing(self) -> bool:
        """Whether another open context uses this one's text encoder (read on the engine thread,
        after the frees queued so far)."""
        handle = self.handle
        if handle is None or handle.ptr is None:
            return False
        return bool(self.thread.run(lambda: handle.ptr is not None and handle.sharing))

    # -- the engine's calls ------------------------------------------------------------------
    def default_sampler(self, sampler: str | None) -> tuple[str, int]:
        """The sampler's name (the engine's default when None) and its method id."""
        def read(ctx: SdCtx) -> tuple[str, int]:
            method = (lib.sd_get_default_sample_method(ctx) if sampler is None
                      else lib.str_to_sample_method(sampler.encode()))
            return string(lib.sd_sample_method_name(method)), method
        return self.run(read)

    def default_scheduler(self, method: int) -> str:
        def read(ctx: SdCtx) -> str:
            return string(lib.sd_scheduler_name(lib.sd_get_default_scheduler(ctx, method)))
        return self.run(read)

    def generate(self, params: CData, keep: list[Any], batch_count: int, *, progress: ProgressFn | None = None,
                 preview: Preview | None = None,
                 token: CancelToken | None = None) -> tuple[list[Image.Image], float, dict[str, str]]:
        """Upstream's generate_image: ``batch_count`` images, the seconds it took and the
        buffers of the weights after it (``all_buffers``, in the same hold)."""
        def generate(ctx: SdCtx) -> tuple[list[Image.Image], float, dict[str, str]]:
            self._ensure(ctx, ENCODER)
            self._ensure(ctx, DIFFUSION)
            out = ffi.new("sd_image_t**")

            def free() -> None:
                for i in range(batch_count):
                    lib.free(out[0][i].data)
                lib.free(out[0])
            with capture() as log:
                try:
                    seconds = self._native(lib.sdcpp_generate, params, out, progress=progress,
                                           preview=preview, cleanup=free)
                except GenerationError as e:
                    raise GenerationError(f"{e}" + (f":\n{log.errors()}" if log.errors() else "")) from None
                finally:
                    self._after_encoding(ctx)
            try:
                return [to_pil(out[0][i]) for i in range(batch_count)], seconds, self._buffers(ctx)
            finally:
                free()
        return self.run(generate, token=token)

    def encode(self, params: CData, keep: list[Any], with_negative: bool, *,
               token: CancelToken | None = None) -> tuple[Parts, float]:
        """Text to conditioning parts (and the seconds the encoder ran)."""
        def encode(ctx: SdCtx) -> tuple[Parts, float]:
            self._before_encoding(ctx)
            out = ffi.new("sdcpp_result_t**")
            try:
                seconds = self._native(lib.sdcpp_encode, params, with_negative, out,
                                       cleanup=lambda: lib.sdcpp_result_free(out[0]))
            finally:
                self._after_encoding(ctx)
            return read_result(out[0]), seconds
        return self.run(encode, token=token)

    def denoise(self, params: CData, keep: list[Any], condition: Parts, init_latent: np.ndarray | None,
                noise: np.ndarray | None, *, progress: ProgressFn | None = None,
                preview: Preview | None = None, token: CancelToken | None = None) -> tuple[np.ndarray, float]:
        """Conditioning (+ init latent, + noise) to one latent."""
        cond = TensorViews(condition)
        init = TensorViews([((0, "latent", 0), init_latent)]) if init_latent is not None else None
        noise_views = TensorViews([((0, "noise", 0), noise)]) if noise is not None else None

        def denoise(ctx: SdCtx) -> tuple[np.ndarray, float]:
            self._ensure(ctx, DIFFUSION)
            out = ffi.new("sdcpp_result_t**")
            seconds = self._native(lib.sdcpp_denoise, params, cond.first, cond.count,
                                   init.first if init else ffi.NULL,
                                   noise_views.first if noise_views else ffi.NULL, 1 if noise_views else 0, out,
                                   progress=progress, preview=preview,
                                   cleanup=lambda: lib.sdcpp_result_free(out[0]))
            (_, data), = read_result(out[0])
            return data, seconds
        return self.run(denoise, token=token)

    def decode(self, params: CData, keep: list[Any], latent: np.ndarray, *,
               token: CancelToken | None = None) -> Image.Image:
        view = TensorViews([((0, "latent", 0), latent)])

        def decode(ctx: SdCtx) -> Image.Image:
            image = ffi.new("sd_image_t*")
            self._native(lib.sdcpp_decode, params, view.first, image, cleanup=lambda: lib.free(image.data))
            try:
                return to_pil(image[0])
            finally:
                lib.free(image.data)
        return self.run(decode, token=token)

    def encode_image(self, params: CData, keep: list[Any], image: CData, *,
                     token: CancelToken | None = None) -> np.ndarray:
        """An ``sd_image_t*`` (kept alive by ``keep``) to a latent."""
        def encode(ctx: SdCtx) -> np.ndarray:
            out = ffi.new("sdcpp_result_t**")
            self._native(lib.sdcpp_encode_image, params, image, out, cleanup=lambda: lib.sdcpp_result_free(out[0]))
            (_, data), = read_result(out[0])
            return data
        return self.run(encode, token=token)

