"""The Engine: the one owner of a native context (handle, cancellation, residency, a
shared text encoder), taking Python values only: paths, ``ContextSettings``, a request,
numpy arrays, PIL images. Native structs are built (``_marshal``) inside the function that
runs on the engine thread, so nothing a native call reads can be freed before it returns,
whatever the caller does meanwhile. Each method is one *hold* on the engine thread: a
residency check and the call it guards are never split. ``isolated.IsolatedEngine`` offers
the same methods from a worker process.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from . import backends
from ._callbacks import capture, preview_scope, progress_scope
from ._engine_thread import ENGINE_THREAD, CancelToken, EngineThread, Operation, Owner
from ._ffi import ffi, lib, string
from ._images import ImageLike
from ._lib_types import SdCtx
from ._marshal import (
    PartKey,
    TensorViews,
    check,
    context_params,
    fill_image,
    image_params,
    read_result,
    to_pil,
    weight_type_id,
)
from .errors import ClosedError, GenerationError, InvalidArgumentError, ModelLoadError, SdcppError
from .fileid import stamp
from .residency import COMPONENT_FILE, COMPONENT_NAME, DIFFUSION, ENCODER, ContextHandle
from .settings import ContextSettings, GenerationSettings, Preview, ProgressFn

Parts = list[tuple[PartKey, np.ndarray]]
T = TypeVar("T")


class Engine(Owner):
    """A native context and everything that touches it.

    ``paths`` are the files the context is made from (reloads read them again);
    ``release_encoder``: free the text encoder after each encoding;
    ``release_diffusion``: free the diffusion model before each encoding.
    """

    isolated = False

    def __init__(self, paths: dict[str, Path | None], *, release_encoder: bool = False,
                 release_diffusion: bool = False, thread: EngineThread = ENGINE_THREAD) -> None:
        super().__init__()
        self.paths = paths
        self.release_encoder_after = release_encoder
        self.release_diffusion_before = release_diffusion
        self.stamps = {ENCODER: stamp(paths.get("llm")), DIFFUSION: stamp(paths.get("diffusion_model"))}
        self.thread = thread
        self.handle: ContextHandle | None = None
        self.tokenizer: Any = None             # the text encoder's tokenizer (a handle of its own)
        self.load_seconds = 0.0
        self.merges_loras = False              # lora_apply_mode immediately: LoRAs merged into the weights
        # the LoRAs (path, multiplier, file stamp) the engine applied last (None: unknown)
        self._applied: frozenset[tuple[str, float, tuple[int, int] | None]] | None = frozenset()

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
        with capture() as log, progress_scope(progress) as state, preview_scope(preview):
            rc = fn(self._ptr(), *args)
        refused = _lora_refusal(log.lines)
        if state.error is not None or refused is not None:
            if rc == 0 and cleanup is not None:
                cleanup()
            if refused is not None:
                raise InvalidArgumentError(refused)
            state.raise_error()
        check(rc, error)
        return time.perf_counter() - start

    # -- lifecycle -------------------------------------------------------------------------
    def open(self, settings: ContextSettings, *, rules: str, vae_decode_only: bool, defer: Sequence[int],
             device: str, weight_buffers: str) -> float:
        """Create the context; returns the seconds it took."""
        backends.load()            # the CPU module (and Vulkan) before any context: once per process

        def create() -> tuple[SdCtx, float]:
            start = time.perf_counter()
            params, keep = context_params(self.paths, settings, rules=rules, vae_decode_only=vae_decode_only)
            lib.sdcpp_bf16_convolutions(settings.vae_weights == "bf16")
            lib.sdcpp_bf16_attention(settings.bf16_attention)
            try:
                with capture() as log, progress_scope(None):
                    ctx = lib.sdcpp_new_ctx(params, sum(1 << c for c in defer), device.encode(),
                                            weight_buffers.encode())
            finally:
                lib.sdcpp_bf16_convolutions(False)
                lib.sdcpp_bf16_attention(True)
            if ctx == ffi.NULL:
                message = log.errors() or string(lib.sdcpp_last_error())
                raise ModelLoadError("stable-diffusion.cpp could not create a context"
                                     + (f":\n{message}" if message else ""))
            return ctx, time.perf_counter() - start

        ctx, self.load_seconds = self.thread.run(create, owner=self, discard=lambda r: lib.sdcpp_free_ctx(r[0]))
        self.merges_loras = settings.lora_apply_mode == "immediately"
        self.handle = ContextHandle(ctx)
        tokenizer = self.thread.run(lambda: lib.sdcpp_tokenizer(ctx))
        self.tokenizer = ffi.gc(tokenizer, lib.sdcpp_tokenizer_free) if tokenizer != ffi.NULL else None
        return self.load_seconds

    def count_tokens(self, text: str) -> int | None:
        """The tokens of ``text`` for the text encoder (None: not an LLM encoder). Runs on the
        caller's thread, never behind an engine call: the tokenizer is a handle of its own."""
        tokenizer = self.tokenizer            # held for the call, whatever close() does meanwhile
        if tokenizer is None:
            return None
        count = ffi.new("int64_t*")
        check(lib.sdcpp_tokenizer_count(tokenizer, text.encode(), count))
        return int(count[0])

    @property
    def closed(self) -> bool:
        return self.handle is None or self.handle.ptr is None

    def close(self) -> None:
        """Free the context once the calls queued before have run (their callers wait for them)."""
        handle = self.handle
        if handle is not None and handle.ptr is not None:
            self.thread.run(lambda: handle.free())      # refused inside a progress callback: nothing changes
        self.tokenizer = None

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

    def load_controlnet(self, path: str | None) -> dict[str, str]:
        """Load a Z-Image ControlNet Union file beside the DiT, replacing one loaded before (None:
        drop it); returns :meth:`controlnet`'s description."""
        def load(ctx: SdCtx) -> dict[str, str]:
            self._native(lib.sdcpp_control_net, (path or "").encode(), error=ModelLoadError)
            return self._controlnet(ctx)
        return self.run(load)

    def controlnet(self) -> dict[str, str]:
        """The loaded ControlNet: variant, channels, layers, refiner, bytes ({} when none)."""
        return self.run(self._controlnet)

    @staticmethod
    def _controlnet(ctx: SdCtx) -> dict[str, str]:
        text = ffi.new("char[]", 256)
        check(lib.sdcpp_control_net_info(ctx, text, 256))
        return dict(item.split("=", 1) for item in ffi.string(text).decode().split(",") if item)

    def _release(self, ctx: SdCtx, component: int) -> None:
        if lib.sdcpp_component_loaded(ctx, component):
            self._native(lib.sdcpp_component_release, component, error=ModelLoadError)

    def _ensure(self, ctx: SdCtx, component: int) -> None:
        if lib.sdcpp_component_loaded(ctx, component):
            return
        path = self.paths.get(COMPONENT_FILE[component])
        if path is None or not path.is_file():
            raise ModelLoadError(f"cannot reload the {COMPONENT_NAME[component]}: {path} is gone")
        if stamp(path) != self.stamps.get(component):
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

    @contextmanager
    def _lora_weights(self, ctx: SdCtx, loras: Sequence[tuple[str, float]]) -> Iterator[None]:
        """Around a call that applies ``loras``; the engine keeps what it applied for the next call.

        Applied at run time, the engine keeps the LoRAs it loaded while they are asked for again
        (vendor/patches/0013); a file changed under the same path makes it forget them first.
        Merged into the weights (lora_apply_mode immediately): before a call with other LoRAs than
        those merged, the weights are read again from their files and the engine forgets what it
        merged, so the new LoRAs go into the file's weights (the engine's own unmerge subtracts,
        which leaves rounding in quantized and 16-bit weights). After a failed call what the engine
        holds is unknown: the next call starts afresh."""
        want = frozenset((path, m, _file_stamp(path)) for path, m in {p: m for p, m in loras if m != 0.0}.items())
        if want == self._applied:
            yield
            return
        if self.merges_loras and self._applied != frozenset():
            for component in (DIFFUSION, ENCODER):
                if lib.sdcpp_component_loaded(ctx, component):
                    self._release(ctx, component)
                    self._ensure(ctx, component)
            check(lib.sdcpp_forget_loras(ctx), GenerationError)
        elif not self.merges_loras:
            seen = {path: st for path, _, st in self._applied} if self._applied is not None else None
            if seen is None or any(seen.get(path, st) != st for path, _, st in want):
                check(lib.sdcpp_forget_loras(ctx), GenerationError)
        self._applied = None
        yield
        self._applied = want

    def borrow_encoder(self, owner: Engine | Any) -> None:
        """Use ``owner``'s text encoder (this context's own is freed): one copy for both."""
        if not isinstance(owner, Engine):
            raise InvalidArgumentError("an isolated pipeline's text encoder lives in its own process: "
                                       "it cannot be shared")

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
    def default_method(self, sampler: str | None) -> tuple[str, str]:
        """The sampler's name (the engine's default for this model when None) and the scheduler
        the engine picks for it."""
        def read(ctx: SdCtx) -> tuple[str, str]:
            method = (lib.sd_get_default_sample_method(ctx) if sampler is None
                      else lib.str_to_sample_method(sampler.encode()))
            scheduler = lib.sd_get_default_scheduler(ctx, method)
            return string(lib.sd_sample_method_name(method)), string(lib.sd_scheduler_name(scheduler))
        return self.run(read)

    def generate(self, s: GenerationSettings, init_image: ImageLike | None = None,
                 ref_images: Sequence[ImageLike] = (), mask: Image.Image | None = None, *,
                 control_image: ImageLike | None = None,
                 progress: ProgressFn | None = None,
                 preview: Preview | None = None,
                 token: CancelToken | None = None) -> tuple[list[Image.Image], float, dict[str, str], dict[str, int]]:
        """Upstream's generate_image: the request's images, the seconds it took, the buffers of the
        weights after it (``all_buffers``, in the same hold) and what a step cache skipped."""
        def generate(ctx: SdCtx) -> tuple[list[Image.Image], float, dict[str, str], dict[str, int]]:
            self._ensure(ctx, ENCODER)
            self._ensure(ctx, DIFFUSION)
            params, keep = image_params(s, init_image=init_image, ref_images=ref_images, mask=mask,
                                        control_image=control_image)
            out = ffi.new("sd_image_t**")

            def free() -> None:
                for i in range(s.batch_count):
                    lib.free(out[0][i].data)
                lib.free(out[0])
            with capture() as log, self._lora_weights(ctx, s.loras):
                try:
                    seconds = self._native(lib.sdcpp_generate, params, out, progress=progress,
                                           preview=preview, cleanup=free)
                except GenerationError as e:
                    raise GenerationError(f"{e}" + (f":\n{log.errors()}" if log.errors() else "")) from None
                finally:
                    self._after_encoding(ctx)
            try:
                return ([to_pil(out[0][i]) for i in range(s.batch_count)], seconds, self._buffers(ctx),
                        cache_report(log.lines))
            finally:
                free()
        return self.run(generate, token=token)

    def encode(self, s: GenerationSettings, with_negative: bool, *,
               token: CancelToken | None = None) -> tuple[Parts, float]:
        """The request's prompt (and negative prompt) to conditioning parts, and the seconds."""
        def encode(ctx: SdCtx) -> tuple[Parts, float]:
            self._before_encoding(ctx)
            params, keep = image_params(s)
            out = ffi.new("sdcpp_result_t**")
            try:
                with self._lora_weights(ctx, s.loras):
                    seconds = self._native(lib.sdcpp_encode, params, with_negative, out,
                                           cleanup=lambda: lib.sdcpp_result_free(out[0]))
            finally:
                self._after_encoding(ctx)
            return read_result(out[0]), seconds
        return self.run(encode, token=token)

    def denoise(self, s: GenerationSettings, condition: Parts, init_latent: np.ndarray | None = None,
                noise: np.ndarray | None = None, ref_images: Sequence[ImageLike] = (),
                mask: Image.Image | None = None, *, control: np.ndarray | None = None,
                progress: ProgressFn | None = None, preview: Preview | None = None,
                token: CancelToken | None = None) -> tuple[np.ndarray, float, dict[str, int]]:
        """Conditioning (+ init latent, + noise, + a ControlNet's control latent) to one latent,
        the seconds and what a step cache skipped."""
        def denoise(ctx: SdCtx) -> tuple[np.ndarray, float, dict[str, int]]:
            self._ensure(ctx, DIFFUSION)
            params, keep = image_params(s, ref_images=ref_images, mask=mask)
            cond = TensorViews(condition)
            init = TensorViews([((0, "latent", 0), init_latent)]) if init_latent is not None else None
            noise_views = TensorViews([((0, "noise", 0), noise)]) if noise is not None else None
            control_view = TensorViews([((0, "control", 0), control)]) if control is not None else None
            out = ffi.new("sdcpp_result_t**")
            with capture() as log, self._lora_weights(ctx, s.loras):
                seconds = self._native(lib.sdcpp_denoise, params, cond.first, cond.count,
                                       init.first if init else ffi.NULL,
                                       noise_views.first if noise_views else ffi.NULL, 1 if noise_views else 0,
                                       control_view.first if control_view else ffi.NULL, out,
                                       progress=progress, preview=preview,
                                       cleanup=lambda: lib.sdcpp_result_free(out[0]))
            (_, data), = read_result(out[0])
            return data, seconds, cache_report(log.lines)
        return self.run(denoise, token=token)

    def decode(self, s: GenerationSettings, latent: np.ndarray, *, token: CancelToken | None = None) -> Image.Image:
        """A latent to the image of the request's size (and VAE tiling)."""
        def decode(ctx: SdCtx) -> Image.Image:
            params, keep = image_params(s)
            view = TensorViews([((0, "latent", 0), latent)])
            image = ffi.new("sd_image_t*")
            self._native(lib.sdcpp_decode, params, view.first, image, cleanup=lambda: lib.free(image.data))
            try:
                return to_pil(image[0])
            finally:
                lib.free(image.data)
        return self.run(decode, token=token)

    def encode_image(self, s: GenerationSettings, image: ImageLike, *, token: CancelToken | None = None) -> np.ndarray:
        """An image to a latent (the VAE encoder), seeded and sized by the request."""
        def encode(ctx: SdCtx) -> np.ndarray:
            params, keep = image_params(s)
            sd_image = ffi.new("sd_image_t*")
            keep += [sd_image, fill_image(sd_image[0], image)]   # alive until this function returns
            out = ffi.new("sdcpp_result_t**")
            self._native(lib.sdcpp_encode_image, params, sd_image, out,
                         cleanup=lambda: lib.sdcpp_result_free(out[0]))
            (_, data), = read_result(out[0])
            return data
        return self.run(encode, token=token)


_LORA_PART = re.compile(r"Only \((\d+) / (\d+)\) LoRA tensors have been applied, lora_file_path = (.*)")
_LORA_FAILED = re.compile(r"load lora tensors from (.*) failed")


def _file_stamp(path: str) -> tuple[int, int] | None:
    try:
        return stamp(Path(path))
    except OSError:
        return None


def _lora_refusal(lines: list[tuple[int, str]]) -> str | None:
    """The engine's word that a LoRA applied in part, or not at all: refused, never half-applied."""
    for _, text in lines:
        if m := _LORA_PART.search(text):
            return (f"{Path(m[3].strip()).name}: the engine reads {m[1]} of its {m[2]} LoRA tensors (a layout, or a "
                    "model, it matches only in part); refused rather than applied in part")
        if m := _LORA_FAILED.search(text):
            return f"{Path(m[1].strip()).name}: the engine could not read it as a LoRA"
    return None


_CACHE_SKIPPED = re.compile(r"(EasyCache|UCache|CacheDIT|Spectrum) skipped (\d+)/(\d+) steps")
_CACHE_RAN = re.compile(r"(EasyCache|UCache|CacheDIT|Spectrum) completed without skipping steps")


def cache_report(lines: list[tuple[int, str]]) -> dict[str, int]:
    """The steps a step cache skipped in a call ({} when none ran): ``skipped`` of ``steps``."""
    out: dict[str, int] = {}
    for _, text in lines:
        if m := _CACHE_SKIPPED.search(text):
            out["skipped"] = out.get("skipped", 0) + int(m[2])
            out["steps"] = out.get("steps", 0) + int(m[3])
        elif _CACHE_RAN.search(text):
            out.setdefault("skipped", 0)
    return out


def convert(src: Path, vae: Path | None, out: Path, *, wtype: str | None, rules: str, convert_name: bool,
            progress: ProgressFn | bool | None, thread: EngineThread = ENGINE_THREAD) -> tuple[bool, str]:
    """The engine's model conversion on the engine thread: (succeeded, the engine's error lines)."""
    def run() -> tuple[bool, str]:
        with capture() as log, progress_scope(progress) as state:
            ok = lib.convert(str(src).encode(), str(vae or "").encode(), str(out).encode(), weight_type_id(wtype),
                             rules.encode(), convert_name)
        state.raise_error()
        return bool(ok), log.errors()
    return thread.run(run)


def canny(image: ImageLike, *, high: float = 0.08, low: float = 0.08, weak: float = 0.8, strong: float = 1.0,
          inverse: bool = False) -> Image.Image:
    """The engine's Canny edge preprocessor (sd-cli's ``--canny``, its thresholds by default) on an RGB
    copy of ``image``: white edges on black. A pure function of the image (any thread)."""
    struct = ffi.new("sd_image_t*")
    rgb, buf = fill_image(struct[0], image)
    if not lib.preprocess_canny(struct[0], high, low, weak, strong, inverse):
        raise GenerationError("the Canny preprocessor failed")
    return Image.fromarray(rgb.copy())
