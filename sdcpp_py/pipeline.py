"""A resident stable-diffusion.cpp context: load once, generate many times.

Two ways to generate: ``generate()`` is upstream's one-shot ``generate_image``;
``encode()`` → ``denoise()`` → ``decode()`` are the same steps as separate calls
(our native shim), so one prompt encoding serves many seeds, sizes and step
counts. Both give the same pixels for the same settings.
"""

from __future__ import annotations

import hashlib
import logging
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
from PIL import Image

from . import backends
from ._callbacks import ProgressFn, capture, native_calls, progress_scope
from ._ffi import ffi, lib
from ._images import ImageLike, as_pil, fill_image, to_pil
from .cache import EncodingCache
from .checks import check_conditioning, check_latent, check_ref_images, check_schedule
from .errors import ClosedError, GenerationError, IncompatibleModelError, InvalidArgumentError, ModelLoadError
from .families import FLUX2_DEV, FLUX2_KLEIN, Z_IMAGE, Components, check_components
from .presets import Preset, get_preset, preset_for_family
from .settings import ContextSettings, GenerationSettings, resolve_seed
from .weights import WeightPlan, parse_buffers, plan_weights
from .residency import COMPONENT_FILE, COMPONENT_NAME, DIFFUSION, ENCODER, ContextHandle, Residency, file_stamp
from .staged import Conditioning, Latent, TensorViews, check, read_result

logger = logging.getLogger("sdcpp_py")
PathLike = Union[str, Path]
LATENT_SCALE = {Z_IMAGE: 8, FLUX2_KLEIN: 16, FLUX2_DEV: 16}


@dataclass
class GenerationResult:
    """Images of one call, the settings that made them and where the time went."""

    images: List[Image.Image]
    settings: GenerationSettings
    seeds: List[int]
    timings: Dict[str, float] = field(default_factory=dict)
    weights: Dict[str, Any] = field(default_factory=dict)   # the weight policy's plan and buffers

    @property
    def image(self) -> Image.Image:
        return self.images[0]

    @property
    def arrays(self) -> List[np.ndarray]:
        """The images as ``uint8`` arrays of shape (height, width, channels)."""
        return [np.asarray(im) for im in self.images]


class Pipeline(Residency):
    """Models loaded once into one engine context, generating as often as asked.

    Give the components of a split model (``diffusion_model``, ``llm``, ``vae``)
    or one single-file ``model``. Files are checked before the engine sees them
    (missing, corrupt, wrong VAE, wrong text encoder width raise ModelLoadError
    subclasses). ``preset`` supplies generation defaults; by default it follows
    the detected family. ``cache_size`` bounds the prompt-encoding cache.
    """

    def __init__(self, *, model: Optional[PathLike] = None, diffusion_model: Optional[PathLike] = None,
                 llm: Optional[PathLike] = None, vae: Optional[PathLike] = None,
                 settings: Optional[ContextSettings] = None, preset: Union[str, Preset, None] = None,
                 cache_size: int = 16, share_encoder_with: Optional["Pipeline"] = None,
                 **settings_kwargs: Any) -> None:
        self._handle: Optional[ContextHandle] = None
        if settings is not None and settings_kwargs:
            raise TypeError("give settings= or setting keywords, not both")
        self.settings = settings if settings is not None else ContextSettings(**settings_kwargs)
        self.paths: Dict[str, Optional[Path]] = {
            "model": _path(model), "diffusion_model": _path(diffusion_model), "llm": _path(llm), "vae": _path(vae)}
        self.components: Components = check_components(**self.paths)
        self.family = self.components.family
        self.preset: Optional[Preset] = get_preset(preset) if preset is not None else preset_for_family(self.family)
        self.encoder_id = _file_identity(self.paths["llm"] or self.paths["model"])
        self.encodings = EncodingCache(cache_size)
        self.load_count = 0
        self.load_seconds = 0.0
        self._stamps = {ENCODER: file_stamp(self.paths["llm"]), DIFFUSION: file_stamp(self.paths["diffusion_model"])}
        if share_encoder_with is None:
            self._load()
        else:
            self._load_sharing_encoder(share_encoder_with)

    # -- lifecycle ---------------------------------------------------------------------------
    def _load(self, *, defer_encoder: bool = False) -> None:
        params = ffi.new("sd_ctx_params_t*")
        lib.sd_ctx_params_init(params)
        keep = []
        for name, path in self.paths.items():
            if path is not None:
                keep.append(ffi.new("char[]", str(path).encode()))
                setattr(params, "model_path" if name == "model" else f"{name}_path", keep[-1])
        self.settings.fill(params)
        deferred = [c for c, flag in ((ENCODER, self.settings.release_encoder or defer_encoder),
                                      (DIFFUSION, self.settings.release_diffusion)) if flag]
        for c in deferred:
            if self.paths[COMPONENT_FILE[c]] is None and not (c == ENCODER and defer_encoder):
                raise InvalidArgumentError(f"releasing the {COMPONENT_NAME[c]} needs it in a file of its own "
                                           f"({COMPONENT_FILE[c]}=...)")
        device = self._resolve_device()
        self.weight_plan = plan_weights(self.settings.upcast, self.paths, on_cpu=self.device == "CPU",
                                        wtype=self.settings.wtype, repack=self.settings.repack,
                                        target=self.settings.upcast_type)
        rules = ",".join(r for r in (self.settings.tensor_type_rules, self.weight_plan.rules) if r)
        if rules:
            keep.append(ffi.new("char[]", rules.encode()))
            params.tensor_type_rules = keep[-1]
        logger.info("weights: %s", self.weight_plan.reason)
        start = time.perf_counter()
        with native_calls.hold(), capture() as log, progress_scope(None):
            ctx = lib.sdcpp_new_ctx(params, sum(1 << c for c in deferred), (device or "").encode(),
                                    self.weight_plan.native_buffers.encode())
        self.load_seconds = time.perf_counter() - start
        if ctx == ffi.NULL:
            raise ModelLoadError("stable-diffusion.cpp could not create a context"
                                 + (f":\n{log.errors()}" if log.errors() else ""))
        self._handle = ContextHandle(ctx)
        weakref.finalize(self, self._handle.free)   # a pipeline dropped without close() frees it too
        self.load_count += 1
        logger.info("loaded %s model in %.2f s", self.family, self.load_seconds)

    @property
    def upcast(self) -> WeightPlan:
        """The weight plan (this name from before the plan covered repacking)."""
        return self.weight_plan

    @property
    def weights(self) -> Dict[str, Any]:
        """The weight policy's plan, and each component's resident bytes per buffer now
        (``{"CPU": ..., "CPU_REPACK": ...}``; empty while released)."""
        out = self.weight_plan.to_dict()
        out["cpu_variant"] = backends.load() if self.device == "CPU" else None
        buffers = {}
        for name, component in (("diffusion", DIFFUSION), ("encoder", ENCODER)):
            text = ffi.new("char[]", 1024)
            check(self._query(lib.sdcpp_component_buffers, component, text, 1024))
            buffers[name] = parse_buffers(ffi.string(text).decode())
        out["buffers"] = buffers
        return out

    def _resolve_device(self) -> Optional[str]:
        """The ggml device this context runs on (None: the engine's choice); sets ``self.device``."""
        backends.load()
        device = backends.resolve_device(self.settings.backend, self.settings.device)
        self.device = device or backends.default_device()
        return device

    def close(self) -> None:
        """Free the models. Safe to call more than once (not from a progress callback)."""
        with native_calls.hold():
            if self._handle is not None:
                self._handle.free()

    @property
    def _ctx(self):
        """The native context, or None once closed."""
        return self._handle.ptr if self._handle is not None else None

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

    def _native(self, fn, *args, progress: Optional[ProgressFn] = None, error=GenerationError,
                cleanup: Optional[Callable[[], None]] = None) -> float:
        """Run one shim call on this context, one engine call at a time, progress routed.

        Returns its seconds. When the progress callback raised, ``cleanup`` frees what
        the call returned before the callback's exception is raised."""
        start = time.perf_counter()
        with native_calls.hold(), progress_scope(progress) as state:
            rc = fn(self._require_open(), *args)
        if state.error is not None:
            if rc == 0 and cleanup is not None:
                cleanup()
            state.raise_error()
        check(rc, error)
        return time.perf_counter() - start

    def _query(self, fn, *args):
        """A quick engine read on this context (no progress, no timing)."""
        with native_calls.hold():
            return fn(self._require_open(), *args)

    # -- settings ----------------------------------------------------------------------------
    def settings_for(self, prompt: str, **overrides: Any) -> GenerationSettings:
        """The GenerationSettings a call with these arguments would use (seed resolved)."""
        defaults: Dict[str, Any] = dict(self.preset.generation_defaults()) if self.preset else {}
        given = {k: v for k, v in overrides.items() if v is not None}
        merged = {**defaults, **given}
        merged["seed"] = resolve_seed(overrides.get("seed"))
        s = GenerationSettings(prompt=prompt, **merged)
        s = self._with_engine_defaults(s) if s.sampler is None or s.scheduler is None else s
        check_schedule(s, self.family)
        return s

    def _with_engine_defaults(self, s: GenerationSettings) -> GenerationSettings:
        sampler = s.sampler
        if sampler is None:
            method = self._query(lib.sd_get_default_sample_method)
            sampler = ffi.string(lib.sd_sample_method_name(method)).decode()
        else:
            method = lib.str_to_sample_method(sampler.encode())
        scheduler = s.scheduler
        if scheduler is None:
            scheduler = ffi.string(lib.sd_scheduler_name(self._query(lib.sd_get_default_scheduler, method))).decode()
        return GenerationSettings(**{**s.to_dict(), "sampler": sampler, "scheduler": scheduler})

    # -- one-shot generation -----------------------------------------------------------------
    def generate(self, prompt: str, *, negative_prompt: str = "", width: Optional[int] = None,
                 height: Optional[int] = None, steps: Optional[int] = None,
                 cfg_scale: Optional[float] = None, sampler: Optional[str] = None,
                 scheduler: Optional[str] = None, seed: Optional[int] = None, batch_count: int = 1,
                 flow_shift: Optional[float] = None, guidance: Optional[float] = None,
                 sigmas: Optional[Sequence[float]] = None, init_image: Optional[ImageLike] = None,
                 strength: Optional[float] = None, ref_images: Sequence[ImageLike] = (),
                 progress: Optional[ProgressFn] = None) -> GenerationResult:
        """Text (and optionally an init image, or reference images) to image in one call.

        Unset arguments take the preset's defaults; ``seed=None`` draws a random
        63-bit seed, reported in the result.
        """
        s = self.settings_for(prompt, negative_prompt=negative_prompt, width=width, height=height,
                              steps=steps, cfg_scale=cfg_scale, sampler=sampler, scheduler=scheduler,
                              seed=seed, batch_count=batch_count, flow_shift=flow_shift, guidance=guidance,
                              sigmas=sigmas, strength=strength)
        return self.generate_with(s, init_image=init_image, ref_images=ref_images, progress=progress)

    __call__ = generate

    def generate_with(self, s: GenerationSettings, *, init_image: Optional[ImageLike] = None,
                      ref_images: Sequence[ImageLike] = (),
                      progress: Optional[ProgressFn] = None) -> GenerationResult:
        """Generate with fully specified settings (upstream's generate_image).

        With ``release_diffusion`` the same steps run as staged calls (same pixels),
        so the text encoder and the diffusion model are never loaded together."""
        self._require_open()
        if s.sampler is None or s.scheduler is None:
            s = self._with_engine_defaults(s)
        check_schedule(s, self.family)
        if self.settings.release_diffusion:
            return self._generate_staged(s, init_image=init_image, ref_images=ref_images, progress=progress)
        params, keep = self._params(s, init_image=init_image, ref_images=ref_images)
        self._ensure(ENCODER)
        self._ensure(DIFFUSION)
        start = time.perf_counter()
        with native_calls.hold(), capture() as log, progress_scope(progress) as state:
            images = lib.generate_image(self._require_open(), params)
        seconds = time.perf_counter() - start
        del keep
        self._after_encoding()
        if images == ffi.NULL:
            state.raise_error()
            raise GenerationError("generation failed" + (f":\n{log.errors()}" if log.errors() else ""))
        try:
            out = [to_pil(images[i]) for i in range(s.batch_count)]
        finally:
            for i in range(s.batch_count):
                if images[i].data != ffi.NULL:
                    lib.free(images[i].data)
            lib.free(images)
        state.raise_error()
        return GenerationResult(out, s, s.seeds(), {"generate_s": seconds}, self.weights)

    def _generate_staged(self, s: GenerationSettings, *, init_image: Optional[ImageLike],
                         ref_images: Sequence[ImageLike], progress: Optional[ProgressFn]) -> GenerationResult:
        """generate_image's steps as staged calls: encode, (encode the init image), then per
        image of the batch denoise with seed + i and decode."""
        start = time.perf_counter()
        cond = self.encode(s.prompt, s.negative_prompt if s.cfg_scale != 1.0 else None)
        init = None
        if init_image is not None:
            init = self.encode_image(init_image, seed=s.seed, width=s.width, height=s.height)
        images = []
        for seed in s.seeds():
            latent = self.denoise(cond, width=s.width, height=s.height, steps=s.steps, cfg_scale=s.cfg_scale,
                                  sampler=s.sampler, scheduler=s.scheduler, seed=seed, flow_shift=s.flow_shift,
                                  guidance=s.guidance, sigmas=s.sigmas, init_latent=init,
                                  strength=s.strength if init is not None else None, ref_images=ref_images,
                                  progress=progress)
            images.append(self.decode(latent))
        return GenerationResult(images, s, s.seeds(), {"generate_s": time.perf_counter() - start}, self.weights)

    def _params(self, s: GenerationSettings, *, init_image: Optional[ImageLike] = None,
                ref_images: Sequence[ImageLike] = ()):
        params = ffi.new("sd_img_gen_params_t*")
        lib.sd_img_gen_params_init(params)
        keep: List[Any] = s.fill(params)
        if init_image is not None:
            keep.append(fill_image(params.init_image, init_image))
        if ref_images:
            if isinstance(ref_images, (Image.Image, np.ndarray)):
                raise TypeError("ref_images must be a sequence of images")
            check_ref_images(ref_images)
            refs = ffi.new("sd_image_t[]", len(ref_images))
            keep.append(refs)
            keep.extend(fill_image(refs[i], im) for i, im in enumerate(ref_images))
            params.ref_images, params.ref_images_count = refs, len(ref_images)
        return params, keep

    # -- staged generation -------------------------------------------------------------------
    def encode(self, prompt: str, negative_prompt: Optional[str] = None, *,
               use_cache: bool = True) -> Conditioning:
        """Encode a prompt (and, if given, a negative prompt) once for many denoise() calls.

        A negative encoding is needed for ``cfg_scale != 1``; pass ``negative_prompt=""``
        for the empty one that ``generate()`` uses. Results are cached by prompt and encoder.
        """
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise TypeError(f"negative_prompt must be a str or None, not {type(negative_prompt).__name__}")
        key = (prompt, negative_prompt, self.encoder_id)
        if use_cache:
            hit = self.encodings.get(key)
            if hit is not None:
                return hit
        s = GenerationSettings(prompt=prompt, negative_prompt=negative_prompt or "")
        params, keep = self._params(s)
        self._ensure_encoder()
        out = ffi.new("sdcpp_result_t**")
        seconds = self._native(lib.sdcpp_encode, params, negative_prompt is not None, out,
                               cleanup=lambda: lib.sdcpp_result_free(out[0]))
        del keep
        cond = Conditioning(dict(read_result(out[0])), self.family, self.encoder_id, prompt,
                            negative_prompt, seconds)
        self._after_encoding()
        if use_cache:
            self.encodings.put(key, cond)
        return cond

    def denoise(self, conditioning: Conditioning, *, width: Optional[int] = None, height: Optional[int] = None,
                steps: Optional[int] = None, cfg_scale: Optional[float] = None, sampler: Optional[str] = None,
                scheduler: Optional[str] = None, seed: Optional[int] = None, flow_shift: Optional[float] = None,
                guidance: Optional[float] = None, sigmas: Optional[Sequence[float]] = None,
                init_latent: Optional[Latent] = None, strength: Optional[float] = None,
                noise: Optional[np.ndarray] = None, ref_images: Sequence[ImageLike] = (),
                progress: Optional[ProgressFn] = None) -> Latent:
        """Sample one latent from a conditioning, as generate() samples it for the same seed."""
        self._check_conditioning(conditioning)
        if init_latent is not None:
            self._check_latent(init_latent)
            width, height = width or init_latent.width, height or init_latent.height
        s = self.settings_for(conditioning.prompt, negative_prompt=conditioning.negative_prompt or "",
                              width=width, height=height, steps=steps, cfg_scale=cfg_scale, sampler=sampler,
                              scheduler=scheduler, seed=seed, flow_shift=flow_shift, guidance=guidance,
                              sigmas=sigmas, strength=strength)
        if s.cfg_scale != 1.0 and not conditioning.has_negative:
            raise InvalidArgumentError("cfg_scale != 1 needs a negative encoding: encode(prompt, negative_prompt='')")
        params, keep = self._params(s, ref_images=ref_images)
        self._ensure(DIFFUSION)
        cond = TensorViews(list(conditioning.parts.items()))
        init = TensorViews([((0, "latent", 0), init_latent.data)]) if init_latent is not None else None
        if noise is not None:
            noise = np.asarray(noise)
            if noise.dtype.kind != "f":
                raise TypeError("noise must be a float array")
            if not np.isfinite(noise).all():
                raise InvalidArgumentError("noise holds NaN or infinite values")
        noise_views = TensorViews([((0, "noise", 0), noise)]) if noise is not None else None
        out = ffi.new("sdcpp_result_t**")
        seconds = self._native(lib.sdcpp_denoise, params, cond.first, cond.count,
                               init.first if init else ffi.NULL,
                               noise_views.first if noise_views else ffi.NULL, 1 if noise_views else 0, out,
                               progress=progress, cleanup=lambda: lib.sdcpp_result_free(out[0]))
        del keep
        (_, data), = read_result(out[0])
        return Latent(data, self.family, LATENT_SCALE.get(self.family, 8), s.seed,
                      {"settings": s, "denoise_s": seconds})

    def decode(self, latent: Latent, *, output_type: str = "pil") -> Union[Image.Image, np.ndarray]:
        """Latent to image: a PIL image, or with ``output_type="np"`` a uint8 array (H, W, 3)."""
        if output_type not in ("pil", "np"):
            raise InvalidArgumentError("output_type must be 'pil' or 'np'")
        self._check_latent(latent)
        s = GenerationSettings(prompt="", width=latent.width, height=latent.height)
        params, keep = self._params(s)
        view = TensorViews([((0, "latent", 0), latent.data)])
        image = ffi.new("sd_image_t*")
        self._native(lib.sdcpp_decode, params, view.first, image, cleanup=lambda: lib.free(image.data))
        try:
            pil = to_pil(image[0])
        finally:
            lib.free(image.data)
        return pil if output_type == "pil" else np.asarray(pil)

    def encode_image(self, image: ImageLike, *, seed: int = 0, width: Optional[int] = None,
                     height: Optional[int] = None) -> Latent:
        """Image to latent (the VAE encoder), seeded as generate() seeds an init image's encoding."""
        pil = as_pil(image)
        s = GenerationSettings(prompt="", width=width or pil.width, height=height or pil.height,
                               seed=resolve_seed(seed))
        params, keep = self._params(s)
        sd_image = ffi.new("sd_image_t*")
        keep.append(fill_image(sd_image[0], pil))
        out = ffi.new("sdcpp_result_t**")
        self._native(lib.sdcpp_encode_image, params, sd_image, out, cleanup=lambda: lib.sdcpp_result_free(out[0]))
        del keep
        (_, data), = read_result(out[0])
        return Latent(data, self.family, LATENT_SCALE.get(self.family, 8), s.seed)

    def sweep(self, prompt: str, **grid: Any):
        """Images for every combination of the given values, one encoding per prompt.

        See :func:`sdcpp_py.sweep.sweep` for the arguments.
        """
        from .sweep import sweep

        return sweep(self, prompt, **grid)

    # -- checks ----------------------------------------------------------------------------
    def _check_conditioning(self, c: Conditioning) -> None:
        check_conditioning(c, self.family, self.components.dit_context_dim)
        if c.encoder != self.encoder_id:
            logger.warning("conditioning comes from another text encoder (%s)", c.encoder)

    def _check_latent(self, latent: Latent) -> None:
        check_latent(latent, self.family)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Pipeline {self.family} {state} device={getattr(self, 'device', None)} threads={self.settings.n_threads}>"


def _path(p: Optional[PathLike]) -> Optional[Path]:
    if p is None:
        return None
    if not isinstance(p, (str, Path)):
        raise TypeError(f"model paths must be str or Path, not {type(p).__name__}")
    return Path(p).expanduser().resolve()


def _file_identity(p: Optional[Path]) -> str:
    if p is None:
        return "none"
    st = p.stat()
    return f"{p.name}:{hashlib.sha1(f'{p}:{st.st_size}:{st.st_mtime_ns}'.encode()).hexdigest()[:12]}"
