"""A resident stable-diffusion.cpp context: load once, generate many times."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
from PIL import Image

from ._callbacks import ProgressFn, native_call_lock, progress_scope
from ._ffi import ffi, lib
from .errors import ClosedError, GenerationError, ModelLoadError
from .families import Components, check_components
from .presets import Preset, get_preset, preset_for_family
from .settings import ContextSettings, GenerationSettings, resolve_seed

logger = logging.getLogger("sdcpp_py")
PathLike = Union[str, Path]


@dataclass
class GenerationResult:
    """Images of one call, the settings that made them and where the time went."""

    images: List[Image.Image]
    settings: GenerationSettings
    seeds: List[int]
    timings: Dict[str, float] = field(default_factory=dict)

    @property
    def image(self) -> Image.Image:
        return self.images[0]

    @property
    def arrays(self) -> List[np.ndarray]:
        """The images as ``uint8`` arrays of shape (height, width, channels)."""
        return [np.asarray(im) for im in self.images]


class _NativeLog(logging.Handler):
    """Collects the engine's log lines while a native call runs."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def errors(self) -> str:
        lines = [r.getMessage() for r in self.records if r.levelno >= logging.ERROR]
        return "\n".join(lines[-5:])


class Pipeline:
    """Models loaded once into one engine context, generating as often as asked.

    Give the components of a split model (``diffusion_model``, ``llm``, ``vae``)
    or one single-file ``model``. Files are checked before the engine sees them
    (missing, corrupt, wrong VAE, wrong text encoder width raise ModelLoadError
    subclasses). ``preset`` supplies generation defaults; by default it follows
    the detected family.
    """

    def __init__(self, *, model: Optional[PathLike] = None, diffusion_model: Optional[PathLike] = None,
                 llm: Optional[PathLike] = None, vae: Optional[PathLike] = None,
                 settings: Optional[ContextSettings] = None, preset: Union[str, Preset, None] = None,
                 **settings_kwargs: Any) -> None:
        self._ctx = None
        if settings is not None and settings_kwargs:
            raise TypeError("give settings= or setting keywords, not both")
        self.settings = settings if settings is not None else ContextSettings(**settings_kwargs)
        self.paths: Dict[str, Optional[Path]] = {
            "model": _path(model), "diffusion_model": _path(diffusion_model), "llm": _path(llm), "vae": _path(vae)}
        self.components: Components = check_components(**self.paths)
        self.family = self.components.family
        self.preset: Optional[Preset] = get_preset(preset) if preset is not None else preset_for_family(self.family)
        self.load_count = 0
        self.load_seconds = 0.0
        self._load()

    # -- lifecycle ---------------------------------------------------------------------------
    def _load(self) -> None:
        params = ffi.new("sd_ctx_params_t*")
        lib.sd_ctx_params_init(params)
        keep = []
        for name, path in self.paths.items():
            if path is not None:
                keep.append(ffi.new("char[]", str(path).encode()))
                setattr(params, "model_path" if name == "model" else f"{name}_path", keep[-1])
        self.settings.fill(params)
        start = time.perf_counter()
        with native_call_lock, _capture() as log, progress_scope(None):
            ctx = lib.new_sd_ctx(params)
        self.load_seconds = time.perf_counter() - start
        if ctx == ffi.NULL:
            raise ModelLoadError("stable-diffusion.cpp could not create a context"
                                 + (f":\n{log.errors()}" if log.errors() else ""))
        self._ctx = ffi.gc(ctx, lib.free_sd_ctx)
        self.load_count += 1
        logger.info("loaded %s model in %.2f s", self.family, self.load_seconds)

    def close(self) -> None:
        """Free the models. Safe to call more than once."""
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            with native_call_lock:
                ffi.release(ctx)

    @property
    def closed(self) -> bool:
        return self._ctx is None

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_open(self):
        if self._ctx is None:
            raise ClosedError("this Pipeline is closed")
        return self._ctx

    # -- generation --------------------------------------------------------------------------
    def settings_for(self, prompt: str, **overrides: Any) -> GenerationSettings:
        """The GenerationSettings a call with these arguments would use (seed resolved)."""
        defaults: Dict[str, Any] = dict(self.preset.generation_defaults()) if self.preset else {}
        given = {k: v for k, v in overrides.items() if v is not None}
        merged = {**defaults, **given}
        merged["seed"] = resolve_seed(overrides.get("seed"))
        return GenerationSettings(prompt=prompt, **merged)

    def generate(self, prompt: str, *, negative_prompt: str = "", width: Optional[int] = None,
                 height: Optional[int] = None, steps: Optional[int] = None,
                 cfg_scale: Optional[float] = None, sampler: Optional[str] = None,
                 scheduler: Optional[str] = None, seed: Optional[int] = None, batch_count: int = 1,
                 flow_shift: Optional[float] = None, guidance: Optional[float] = None,
                 progress: Optional[ProgressFn] = None) -> GenerationResult:
        """Text to image. Unset arguments take the preset's defaults; ``seed=None``
        draws a random 63-bit seed, reported in the result."""
        s = self.settings_for(prompt, negative_prompt=negative_prompt, width=width, height=height,
                              steps=steps, cfg_scale=cfg_scale, sampler=sampler, scheduler=scheduler,
                              seed=seed, batch_count=batch_count, flow_shift=flow_shift, guidance=guidance)
        return self.generate_with(s, progress=progress)

    __call__ = generate

    def generate_with(self, s: GenerationSettings, *, progress: Optional[ProgressFn] = None) -> GenerationResult:
        """Generate with fully specified settings."""
        ctx = self._require_open()
        if s.sampler is None or s.scheduler is None:
            s = self._with_engine_defaults(s)
        params = ffi.new("sd_img_gen_params_t*")
        lib.sd_img_gen_params_init(params)
        keep = s.fill(params)
        start = time.perf_counter()
        with native_call_lock, _capture() as log, progress_scope(progress):
            images = lib.generate_image(ctx, params)
        seconds = time.perf_counter() - start
        del keep
        if images == ffi.NULL:
            raise GenerationError("generation failed" + (f":\n{log.errors()}" if log.errors() else ""))
        try:
            out = [_to_pil(images[i]) for i in range(s.batch_count)]
        finally:
            for i in range(s.batch_count):
                if images[i].data != ffi.NULL:
                    lib.free(images[i].data)
            lib.free(images)
        return GenerationResult(out, s, s.seeds(), {"generate_s": seconds})

    def _with_engine_defaults(self, s: GenerationSettings) -> GenerationSettings:
        ctx = self._require_open()
        sampler = s.sampler
        if sampler is None:
            method = lib.sd_get_default_sample_method(ctx)
            sampler = ffi.string(lib.sd_sample_method_name(method)).decode()
        else:
            method = lib.str_to_sample_method(sampler.encode())
        scheduler = s.scheduler
        if scheduler is None:
            scheduler = ffi.string(lib.sd_scheduler_name(lib.sd_get_default_scheduler(ctx, method))).decode()
        return GenerationSettings(**{**s.to_dict(), "sampler": sampler, "scheduler": scheduler})

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Pipeline {self.family} {state} threads={self.settings.n_threads}>"


def _path(p: Optional[PathLike]) -> Optional[Path]:
    if p is None:
        return None
    if not isinstance(p, (str, Path)):
        raise TypeError(f"model paths must be str or Path, not {type(p).__name__}")
    return Path(p).expanduser().resolve()


def _to_pil(img) -> Image.Image:
    w, h, c = img.width, img.height, img.channel
    if img.data == ffi.NULL or c not in (1, 3, 4):
        raise GenerationError(f"engine returned an empty image ({w}x{h}x{c})")
    arr = np.frombuffer(ffi.buffer(img.data, w * h * c), dtype=np.uint8).reshape(h, w, c).copy()
    return Image.fromarray(arr[:, :, 0] if c == 1 else arr)


class _capture:
    """Context manager collecting native log lines during one call."""

    def __enter__(self) -> _NativeLog:
        self.handler = _NativeLog()
        logging.getLogger("sdcpp_py.native").addHandler(self.handler)
        return self.handler

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("sdcpp_py.native").removeHandler(self.handler)
