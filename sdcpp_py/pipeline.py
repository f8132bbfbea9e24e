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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np
from PIL import Image

from . import backends
from ._callbacks import Preview, ProgressFn
from ._engine_thread import CancelToken
from ._ffi import ffi, lib
from ._images import ImageLike, as_pil, fill_image
from ._lib_types import CStruct
from .cache import EncodingCache
from .checks import check_conditioning, check_latent, check_ref_images, check_schedule, check_taesd
from .engine import Engine
from .errors import ClosedError, IncompatibleModelError, InvalidArgumentError
from .families import FLUX2_DEV, FLUX2_KLEIN, Z_IMAGE, Components, check_components
from .presets import Preset, get_preset, preset_for_family
from .residency import COMPONENT_FILE, COMPONENT_NAME, DIFFUSION, ENCODER, SHARED_SETTINGS
from .settings import ContextSettings, GenerationSettings, resolve_seed
from .staged import Conditioning, Latent
from .weights import WeightPlan, parse_buffers, plan_weights

if TYPE_CHECKING:
    from .sweep import SweepResult

logger = logging.getLogger("sdcpp_py")
PathLike = str | Path
LATENT_SCALE = {Z_IMAGE: 8, FLUX2_KLEIN: 16, FLUX2_DEV: 16}


@dataclass
class GenerationResult:
    """Images of one call, the settings that made them and where the time went."""

    images: list[Image.Image]
    settings: GenerationSettings
    seeds: list[int]
    timings: dict[str, float] = field(default_factory=dict)
    weights: dict[str, Any] = field(default_factory=dict)   # the weight policy's plan and buffers

    @property
    def image(self) -> Image.Image:
        return self.images[0]

    @property
    def arrays(self) -> list[np.ndarray]:
        """The images as ``uint8`` arrays of shape (height, width, channels)."""
        return [np.asarray(im) for im in self.images]


class Pipeline:
    """Models loaded once into one engine context, generating as often as asked.

    Give the components of a split model (``diffusion_model``, ``llm``, ``vae``)
    or one single-file ``model``. Files are checked before the engine sees them
    (missing, corrupt, wrong VAE, wrong text encoder width raise ModelLoadError
    subclasses). ``preset`` supplies generation defaults; by default it follows
    the detected family. ``cache_size`` bounds the prompt-encoding cache.
    ``isolate=True`` runs the engine in a worker process (:mod:`sdcpp_py.isolated`):
    an engine abort raises EngineCrashed instead of ending this process.

    Threads: a pipeline may be shared. Engine calls of all pipelines of the process
    run one at a time on one engine thread, each public call's residency checks and
    engine call in one hold; ``cancel()`` (any thread), a ``cancel=`` token
    (``threading.Event``) and Ctrl-C stop a call within the graph it computes.
    """

    def __new__(cls, *args: Any, isolate: bool = False, **kwargs: Any) -> Pipeline:
        if isolate and cls is Pipeline:
            from .isolated import IsolatedPipeline
            return super().__new__(IsolatedPipeline)
        return super().__new__(cls)

    def __init__(self, *, model: PathLike | None = None, diffusion_model: PathLike | None = None,
                 llm: PathLike | None = None, vae: PathLike | None = None, taesd: PathLike | None = None,
                 settings: ContextSettings | None = None, preset: str | Preset | None = None,
                 cache_size: int = 16, share_encoder_with: Pipeline | None = None,
                 isolate: bool = False, **settings_kwargs: Any) -> None:
        if settings is not None and settings_kwargs:
            raise TypeError("give settings= or setting keywords, not both")
        self.settings = settings if settings is not None else ContextSettings(**settings_kwargs)
        self.paths: dict[str, Path | None] = {
            "model": _path(model), "diffusion_model": _path(diffusion_model), "llm": _path(llm), "vae": _path(vae)}
        self.components: Components = check_components(**self.paths)
        if taesd is not None:   # the tiny autoencoder: decodes (and previews) instead of the VAE
            self.paths["taesd"] = check_taesd(_path(taesd))
        self.family = self.components.family
        self.preset: Preset | None = get_preset(preset) if preset is not None else preset_for_family(self.family)
        self.encoder_id = _file_identity(self.paths["llm"] or self.paths["model"])
        self.encodings: EncodingCache[Conditioning] = EncodingCache(cache_size)
        self._engine_defaults: dict[str | None, tuple[str, str]] = {}   # sampler asked -> (sampler, scheduler)
        self.load_count = 0
        self.load_seconds = 0.0
        self._engine = Engine(self.paths, release_encoder=self.settings.release_encoder,
                              release_diffusion=self.settings.release_diffusion)
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
        params.vae_decode_only = not self.components.vae_has_encoder
        logger.info("weights: %s", self.weight_plan.reason)
        self._engine.open(params, keep, defer_mask=sum(1 << c for c in deferred), device=device or "",
                          weight_buffers=self.weight_plan.native_buffers)
        weakref.finalize(self, self._engine.close_later)   # dropped without close(): freed on the engine thread
        self.load_seconds = self._engine.load_seconds
        self.load_count += 1
        logger.info("loaded %s model in %.2f s", self.family, self.load_seconds)

    @property
    def upcast(self) -> WeightPlan:
        """The weight plan (this name from before the plan covered repacking)."""
        return self.weight_plan

    @property
    def weights(self) -> dict[str, Any]:
        """The weight policy's plan, and each component's resident bytes per buffer now
        (``{"CPU": ..., "CPU_REPACK": ...}``; empty while released)."""
        return self._weights(self._engine.all_buffers())

    def _weights(self, buffers: dict[str, str]) -> dict[str, Any]:
        out = self.weight_plan.to_dict()
        out["cpu_variant"] = backends.load() if self.device == "CPU" else None
        out["buffers"] = {name: parse_buffers(text) for name, text in buffers.items()}
        return out

    def _resolve_device(self) -> str | None:
        """The ggml device this context runs on (None: the engine's choice); sets ``self.device``."""
        backends.load()
        device = backends.resolve_device(self.settings.backend, self.settings.device)
        self.device = device or backends.default_device()
        return device

    def close(self) -> None:
        """Free the models, after the calls already running or waiting (theirs finish first).

        Safe to call more than once, from any thread but a progress callback. To stop
        a running generation instead of waiting for it, ``cancel()`` first."""
        self._engine.close()

    def cancel(self) -> None:
        """Stop this pipeline's calls begun so far, from any thread: the running one within
        the graph it computes (CPU: after the current graph node), waiting ones before
        they start. Each raises :class:`Cancelled`; the pipeline stays usable and later
        calls run as usual."""
        self._engine.cancel()

    @property
    def closed(self) -> bool:
        return self._engine.closed

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_open(self) -> None:
        if self._engine.closed:
            raise ClosedError("this Pipeline is closed")

    # -- residency ---------------------------------------------------------------------------
    @property
    def encoder_loaded(self) -> bool:
        return self._engine.loaded(ENCODER)

    @property
    def diffusion_loaded(self) -> bool:
        return self._engine.loaded(DIFFUSION)

    @property
    def weight_bytes(self) -> dict[str, int]:
        """Bytes of weights resident now, per component (0 while released)."""
        return self._engine.weight_bytes()

    def release_encoder(self) -> None:
        """Free the text encoder's weights (reloaded from its file when next needed)."""
        self._release(ENCODER)

    def release_diffusion_model(self) -> None:
        """Free the diffusion model's weights (reloaded from its file when next needed)."""
        self._release(DIFFUSION)

    def _release(self, component: int) -> None:
        if self.paths[COMPONENT_FILE[component]] is None:
            raise InvalidArgumentError(f"the {COMPONENT_NAME[component]} can be released only when it comes "
                                       f"from a file of its own ({COMPONENT_FILE[component]}=...)")
        self._engine.release(component)

    @property
    def shares_encoder(self) -> bool:
        return self._engine.sharing

    def _load_sharing_encoder(self, other: Pipeline) -> None:
        """Load everything but the text encoder, then borrow ``other``'s (one copy in memory,
        loaded once)."""
        if not isinstance(other, Pipeline):
            raise TypeError(f"share_encoder_with must be a Pipeline, not {type(other).__name__}")
        other._require_open()
        if other.encoder_id != self.encoder_id or self.paths["llm"] is None:
            raise IncompatibleModelError("only pipelines loading the same text encoder file (llm=...) can share it")
        if self.components.llm_hidden is None or other.components.llm_hidden is None:
            raise IncompatibleModelError("encoder sharing needs LLM-conditioned models (Z-Image, FLUX.2)")
        differ = [n for n in SHARED_SETTINGS if getattr(self.settings, n) != getattr(other.settings, n)]
        self._resolve_device()
        if self.device != other.device:
            differ.append("device")
        if differ:
            raise IncompatibleModelError(f"pipelines sharing a text encoder need the same {', '.join(differ)}")
        self._load(defer_encoder=True)
        self._engine.borrow_encoder(other._engine)

    # -- settings ----------------------------------------------------------------------------
    def settings_for(self, prompt: str, **overrides: Any) -> GenerationSettings:
        """The GenerationSettings a call with these arguments would use (seed resolved)."""
        defaults: dict[str, Any] = dict(self.preset.generation_defaults()) if self.preset else {}
        given = {k: v for k, v in overrides.items() if v is not None}
        merged = {**defaults, **given}
        merged["seed"] = resolve_seed(overrides.get("seed"))
        s = GenerationSettings(prompt=prompt, **merged)
        s = self._with_engine_defaults(s) if s.sampler is None or s.scheduler is None else s
        check_schedule(s, self.family)
        return s

    def _with_engine_defaults(self, s: GenerationSettings) -> GenerationSettings:
        """Fill the sampler and scheduler the engine picks for this model (asked once per
        sampler: later calls need no engine call, so they never wait behind a running one)."""
        known = self._engine_defaults.get(s.sampler)
        if known is None:
            sampler, method = self._engine.default_sampler(s.sampler)
            known = self._engine_defaults[s.sampler] = (sampler, self._engine.default_scheduler(method))
        scheduler = s.scheduler if s.scheduler is not None else known[1]
        return GenerationSettings(**{**s.to_dict(), "sampler": s.sampler or known[0], "scheduler": scheduler})

    # -- one-shot generation -----------------------------------------------------------------
    def generate(self, prompt: str, *, negative_prompt: str = "", width: int | None = None,
                 height: int | None = None, steps: int | None = None,
                 cfg_scale: float | None = None, sampler: str | None = None,
                 scheduler: str | None = None, seed: int | None = None, batch_count: int = 1,
                 flow_shift: float | None = None, guidance: float | None = None,
                 sigmas: Sequence[float] | None = None, init_image: ImageLike | None = None,
                 strength: float | None = None, ref_images: Sequence[ImageLike] = (),
                 vae_tiling: bool | None = None, progress: ProgressFn | None = None,
                 preview: Preview | None = None, cancel: CancelToken | None = None) -> GenerationResult:
        """Text (and optionally an init image, or reference images) to image in one call.

        Unset arguments take the preset's defaults; ``seed=None`` draws a random
        63-bit seed, reported in the result. ``cancel``: a ``threading.Event`` that
        stops the call when set (it raises :class:`Cancelled`). ``preview``: images
        during sampling (:class:`Preview`).
        """
        s = self.settings_for(prompt, negative_prompt=negative_prompt, width=width, height=height,
                              steps=steps, cfg_scale=cfg_scale, sampler=sampler, scheduler=scheduler,
                              seed=seed, batch_count=batch_count, flow_shift=flow_shift, guidance=guidance,
                              sigmas=sigmas, strength=strength, vae_tiling=vae_tiling)
        return self.generate_with(s, init_image=init_image, ref_images=ref_images, progress=progress,
                                  preview=preview, cancel=cancel)

    __call__ = generate

    def generate_with(self, s: GenerationSettings, *, init_image: ImageLike | None = None,
                      ref_images: Sequence[ImageLike] = (), progress: ProgressFn | None = None,
                      preview: Preview | None = None, cancel: CancelToken | None = None) -> GenerationResult:
        """Generate with fully specified settings (upstream's generate_image).

        With ``release_diffusion`` the same steps run as staged calls (same pixels),
        so the text encoder and the diffusion model are never loaded together."""
        self._require_open()
        self._check_vae_encoder(init_image, ref_images)
        with self._engine.operation(cancel):
            if s.sampler is None or s.scheduler is None:
                s = self._with_engine_defaults(s)
            check_schedule(s, self.family)
            if self.settings.release_diffusion:
                return self._generate_staged(s, init_image=init_image, ref_images=ref_images, progress=progress,
                                             preview=preview)
            params, keep = self._params(s, init_image=init_image, ref_images=ref_images)
            images, seconds, buffers = self._engine.generate(params, keep, s.batch_count, progress=progress,
                                                             preview=preview, token=cancel)
            return GenerationResult(images, s, s.seeds(), {"generate_s": seconds}, self._weights(buffers))

    def _generate_staged(self, s: GenerationSettings, *, init_image: ImageLike | None,
                         ref_images: Sequence[ImageLike], progress: ProgressFn | None,
                         preview: Preview | None) -> GenerationResult:
        """generate_image's steps as staged calls: encode, (encode the init image), then per
        image of the batch denoise with seed + i and decode."""
        from .sweep import iter_images

        start = time.perf_counter()
        images = [item.image for item in iter_images(self, s, init_image=init_image, ref_images=ref_images,
                                                     progress=progress, preview=preview)]
        buffers = {} if self.closed else self._engine.all_buffers()   # closed by another thread since
        return GenerationResult(images, s, s.seeds(), {"generate_s": time.perf_counter() - start},
                                self._weights(buffers))

    def _params(self, s: GenerationSettings, *, init_image: ImageLike | None = None,
                ref_images: Sequence[ImageLike] = ()) -> tuple[CStruct, list[Any]]:
        params = ffi.new("sd_img_gen_params_t*")
        lib.sd_img_gen_params_init(params)
        keep: list[Any] = s.fill(params)
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
    def encode(self, prompt: str, negative_prompt: str | None = None, *,
               use_cache: bool = True, cancel: CancelToken | None = None) -> Conditioning:
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
        parts, seconds = self._engine.encode(params, keep, negative_prompt is not None, token=cancel)
        cond = Conditioning(dict(parts), self.family, self.encoder_id, prompt, negative_prompt, seconds)
        if use_cache:
            self.encodings.put(key, cond)
        return cond

    def denoise(self, conditioning: Conditioning, *, width: int | None = None, height: int | None = None,
                steps: int | None = None, cfg_scale: float | None = None, sampler: str | None = None,
                scheduler: str | None = None, seed: int | None = None, flow_shift: float | None = None,
                guidance: float | None = None, sigmas: Sequence[float] | None = None,
                init_latent: Latent | None = None, strength: float | None = None,
                noise: np.ndarray | None = None, ref_images: Sequence[ImageLike] = (),
                progress: ProgressFn | None = None, preview: Preview | None = None,
                cancel: CancelToken | None = None) -> Latent:
        """Sample one latent from a conditioning, as generate() samples it for the same seed."""
        self._check_conditioning(conditioning)
        self._check_vae_encoder(None, ref_images)
        if init_latent is not None:
            self._check_latent(init_latent)
            width, height = width or init_latent.width, height or init_latent.height
        with self._engine.operation(cancel):
            s = self.settings_for(conditioning.prompt, negative_prompt=conditioning.negative_prompt or "",
                                  width=width, height=height, steps=steps, cfg_scale=cfg_scale, sampler=sampler,
                                  scheduler=scheduler, seed=seed, flow_shift=flow_shift, guidance=guidance,
                                  sigmas=sigmas, strength=strength)
            if s.cfg_scale != 1.0 and not conditioning.has_negative:
                raise InvalidArgumentError("cfg_scale != 1 needs a negative encoding: "
                                           "encode(prompt, negative_prompt='')")
            params, keep = self._params(s, ref_images=ref_images)
            if noise is not None:
                noise = np.asarray(noise)
                if noise.dtype.kind != "f":
                    raise TypeError("noise must be a float array")
                if not np.isfinite(noise).all():
                    raise InvalidArgumentError("noise holds NaN or infinite values")
            data, seconds = self._engine.denoise(params, keep, list(conditioning.parts.items()),
                                                 init_latent.data if init_latent is not None else None, noise,
                                                 progress=progress, preview=preview, token=cancel)
        return Latent(data, self.family, LATENT_SCALE.get(self.family, 8), s.seed,
                      {"settings": s, "denoise_s": seconds})

    @overload
    def decode(self, latent: Latent, *, output_type: Literal["pil"] = ..., vae_tiling: bool = False,
               cancel: CancelToken | None = None) -> Image.Image: ...

    @overload
    def decode(self, latent: Latent, *, output_type: Literal["np"], vae_tiling: bool = False,
               cancel: CancelToken | None = None) -> np.ndarray: ...

    def decode(self, latent: Latent, *, output_type: str = "pil", vae_tiling: bool = False,
               cancel: CancelToken | None = None) -> Image.Image | np.ndarray:
        """Latent to image: a PIL image, or with ``output_type="np"`` a uint8 array (H, W, 3).

        ``vae_tiling``: decode in tiles (less memory at large sizes, tile seams possible)."""
        if output_type not in ("pil", "np"):
            raise InvalidArgumentError("output_type must be 'pil' or 'np'")
        self._check_latent(latent)
        s = GenerationSettings(prompt="", width=latent.width, height=latent.height, vae_tiling=vae_tiling)
        params, keep = self._params(s)
        pil = self._engine.decode(params, keep, latent.data, token=cancel)
        return pil if output_type == "pil" else np.asarray(pil)

    def encode_image(self, image: ImageLike, *, seed: int = 0, width: int | None = None,
                     height: int | None = None, cancel: CancelToken | None = None) -> Latent:
        """Image to latent (the VAE encoder), seeded as generate() seeds an init image's encoding."""
        pil = as_pil(image)
        self._check_vae_encoder(pil, ())
        s = GenerationSettings(prompt="", width=width or pil.width, height=height or pil.height,
                               seed=resolve_seed(seed))
        params, keep = self._params(s)
        sd_image = ffi.new("sd_image_t*")
        keep.append(fill_image(sd_image[0], pil))
        keep.append(sd_image)
        data = self._engine.encode_image(params, keep, sd_image, token=cancel)
        return Latent(data, self.family, LATENT_SCALE.get(self.family, 8), s.seed)

    def sweep(self, prompt: str, **grid: Any) -> SweepResult:
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

    def _check_vae_encoder(self, init_image: ImageLike | None, ref_images: Sequence[ImageLike]) -> None:
        if not self.components.vae_has_encoder and (init_image is not None or ref_images):
            what = "an init image (img2img)" if init_image is not None else "reference images"
            raise InvalidArgumentError(f"{what} needs the VAE encoder, and {self.paths['vae'] or self.paths['model']} "
                                       "is a decode-only VAE: give a VAE file with encoder weights")

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        device = getattr(self, "device", None)
        return f"<Pipeline {self.family} {state} device={device} threads={self.settings.n_threads}>"


def _path(p: PathLike | None) -> Path | None:
    if p is None:
        return None
    if not isinstance(p, (str, Path)):
        raise TypeError(f"model paths must be str or Path, not {type(p).__name__}")
    return Path(p).expanduser().resolve()


def _file_identity(p: Path | None) -> str:
    if p is None:
        return "none"
    st = p.stat()
    return f"{p.name}:{hashlib.sha1(f'{p}:{st.st_size}:{st.st_mtime_ns}'.encode()).hexdigest()[:12]}"
