"""A resident stable-diffusion.cpp context: load once, generate many times.

``generate()`` is upstream's one-shot ``generate_image``; ``encode()`` → ``denoise()`` →
``decode()`` are the same steps as separate calls, and ``images()`` is the staged loop every
face uses (one encoding, an image per seed): the same pixels for the same request. The
Pipeline is policy (presets, checks, caches, the weight plan); its engine takes Python values.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
from PIL import Image

from . import backends
from ._engine_thread import CancelToken
from ._images import ImageLike, as_mask, as_pil, prepare
from .cache import EncodingCache
from .checks import (
    LoraInfo,
    check_conditioning,
    check_control_latent,
    check_latent,
    check_lora,
    check_ref_images,
    check_schedule,
    check_taesd,
)
from .controlnet import ControlNetPart, as_control_image
from .engine import Engine
from .errors import ClosedError, IncompatibleModelError, InvalidArgumentError
from .families import FLUX2_DEV, FLUX2_KLEIN, Z_IMAGE, Components, check_components
from .fileid import identity, stamp
from .isolated import IsolatedEngine
from .modelfile import inspect
from .modelset import ModelSet
from .presets import Preset, get_preset, preset_for_family
from .residency import COMPONENT_FILE, COMPONENT_NAME, DIFFUSION, ENCODER, SHARED_SETTINGS
from .settings import (
    ESRGAN_SUFFIXES,
    ContextSettings,
    GenerationSettings,
    Preview,
    ProgressFn,
    request,
    request_fields,
    resolve_seed,
)
from .staged import Conditioning, GenerationResult, ImageItem, Latent, SweepResult
from .weights import VAE_BF16_RULE, WeightPlan, parse_buffers, plan_weights

logger = logging.getLogger("sdcpp_py")
PathLike = str | Path
LATENT_SCALE = {Z_IMAGE: 8, FLUX2_KLEIN: 16, FLUX2_DEV: 16}


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

    def __init__(self, *, model: PathLike | None = None, diffusion_model: PathLike | None = None,
                 llm: PathLike | None = None, vae: PathLike | None = None, taesd: PathLike | None = None,
                 settings: ContextSettings | None = None, preset: str | Preset | None = None,
                 cache_size: int = 16, share_encoder_with: Pipeline | None = None,
                 isolate: bool = False, controlnet: PathLike | None = None, **settings_kwargs: Any) -> None:
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
        self.encoder_id = identity(self.paths["llm"] or self.paths["model"])
        self.encodings: EncodingCache[Conditioning] = EncodingCache(cache_size)
        self._engine_defaults: dict[str | None, tuple[str, str]] = {}   # sampler asked -> (sampler, scheduler)
        self._token_counts: dict[str, int | None] = {}
        self._loras: dict[tuple[str, tuple[int, int] | None], LoraInfo] = {}
        self.load_count = 0
        self.load_seconds = 0.0
        backends.load()
        self._device = backends.resolve_device(self.settings.backend, self.settings.device)
        self.device = self._device or backends.default_device()
        on_cpu = self.device == "CPU"
        if self.settings.vae_weights == "bf16" and not on_cpu:
            raise InvalidArgumentError(f"vae_weights='bf16' is for the CPU backend (its convolutions read BF16); this "
                                       f"pipeline runs on {self.device}")
        self.weight_plan: WeightPlan = plan_weights(
            self.settings.upcast, self.paths, on_cpu=on_cpu, wtype=self.settings.wtype, repack=self.settings.repack,
            target=self.settings.upcast_type, kernels=backends.cpu_kernels() if on_cpu else None)
        self.engine = (IsolatedEngine if isolate else Engine)(
            self.paths, release_encoder=self.settings.release_encoder,
            release_diffusion=self.settings.release_diffusion)
        self.controlnet: ControlNetPart | None = None
        if controlnet is not None:   # checked now, loaded when a control image first needs it
            self.controlnet = ControlNetPart(self.engine, Path(controlnet), self.family)
        if share_encoder_with is None:
            self._open()
        else:
            self._open_sharing_encoder(share_encoder_with)

    @classmethod
    def open_set(cls, m: ModelSet, *, donors: Sequence[Pipeline] = (),
                 **overrides: Any) -> tuple[Pipeline, Pipeline | None]:
        """Open a model set (``overrides``: ContextSettings keywords over its own), borrowing the text
        encoder of the first open donor that loads the same encoder file; returns the pipeline and the
        donor it shares with (None: it loaded its own, also when the settings do not allow sharing)."""
        kwargs = {**m.pipeline_kwargs(), **overrides}
        llm = Path(m.files["llm"]) if m.files.get("llm") else None
        same = identity(llm) if llm is not None and llm.is_file() else None
        for donor in donors:
            if same is not None and not donor.closed and donor.encoder_id == same:
                try:
                    return cls(**kwargs, share_encoder_with=donor), donor
                except (IncompatibleModelError, InvalidArgumentError) as e:
                    logger.warning("%s loads its own text encoder: %s", m.name or "a model set", e)
                    break
        return cls(**kwargs), None

    # -- lifecycle ---------------------------------------------------------------------------
    def _open(self, *, defer_encoder: bool = False) -> None:
        deferred = [c for c, flag in ((ENCODER, self.settings.release_encoder or defer_encoder),
                                      (DIFFUSION, self.settings.release_diffusion)) if flag]
        for c in deferred:
            if self.paths[COMPONENT_FILE[c]] is None and not (c == ENCODER and defer_encoder):
                raise InvalidArgumentError(f"releasing the {COMPONENT_NAME[c]} needs it in a file of its own "
                                           f"({COMPONENT_FILE[c]}=...)")
        rules = ",".join(r for r in (self.settings.tensor_type_rules, self.weight_plan.rules,
                                     VAE_BF16_RULE if self.settings.vae_weights == "bf16" else "") if r)
        logger.info("weights: %s", self.weight_plan.reason)
        self.load_seconds = self.engine.open(self.settings, rules=rules, defer=deferred, device=self._device or "",
                                             vae_decode_only=not self.components.vae_has_encoder,
                                             weight_buffers=self.weight_plan.native_buffers)
        weakref.finalize(self, self.engine.close_later)   # dropped without close(): freed on the engine thread
        self.load_count += 1
        logger.info("loaded %s model in %.2f s", self.family, self.load_seconds)

    def _open_sharing_encoder(self, other: Pipeline) -> None:
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
        if self.device != other.device:
            differ.append("device")
        if differ:
            raise IncompatibleModelError(f"pipelines sharing a text encoder need the same {', '.join(differ)}")
        if self.engine.isolated or other.engine.isolated:
            raise InvalidArgumentError("isolated pipelines cannot share a text encoder (each has its own process)")
        if "immediately" in (self.settings.lora_apply_mode, other.settings.lora_apply_mode):
            raise InvalidArgumentError("lora_apply_mode='immediately' merges LoRAs into the text encoder's weights, "
                                       "which a shared encoder would pass on to the other pipeline")
        self._open(defer_encoder=True)
        self.engine.borrow_encoder(other.engine)

    @property
    def weights(self) -> dict[str, Any]:
        """The weight policy's plan, and each component's resident bytes per buffer now
        (``{"CPU": ..., "CPU_REPACK": ...}``; empty while released)."""
        return self._weights(self.engine.all_buffers())

    def _weights(self, buffers: dict[str, str]) -> dict[str, Any]:
        out = self.weight_plan.to_dict()
        out["cpu_variant"] = backends.load() if self.device == "CPU" else None
        out["buffers"] = {name: parse_buffers(text) for name, text in buffers.items()}
        return out

    def close(self) -> None:
        """Free the models, after the calls already running or waiting (theirs finish first).

        Safe to call more than once, from any thread but a progress callback. To stop
        a running generation instead of waiting for it, ``cancel()`` first."""
        self.engine.close()

    def cancel(self) -> None:
        """Stop this pipeline's calls begun so far, from any thread: the running one within
        the graph it computes (CPU: after the current graph node), waiting ones before
        they start. Each raises :class:`Cancelled`; the pipeline stays usable and later
        calls run as usual."""
        self.engine.cancel()

    @property
    def closed(self) -> bool:
        return self.engine.closed

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_open(self) -> None:
        if self.engine.closed:
            raise ClosedError("this Pipeline is closed")

    # -- residency ---------------------------------------------------------------------------
    @property
    def encoder_loaded(self) -> bool:
        return self.engine.loaded(ENCODER)

    @property
    def diffusion_loaded(self) -> bool:
        return self.engine.loaded(DIFFUSION)

    @property
    def weight_bytes(self) -> dict[str, int]:
        """Bytes of weights resident now, per component (0 while released)."""
        return self.engine.weight_bytes()

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
        self.engine.release(component)

    @property
    def shares_encoder(self) -> bool:
        return self.engine.sharing

    def load_controlnet(self, path: PathLike | None) -> dict[str, str]:
        """Use this ControlNet Union file (None: none), freeing the one loaded before; it loads now.
        Returns the engine's description (variant, channels, layers, bytes)."""
        self._require_open()
        if self.controlnet is not None:
            self.controlnet.release()
            self.controlnet = None
        if path is None:
            return {}
        part = ControlNetPart(self.engine, Path(path), self.family)
        info = part.ensure()
        self.controlnet = part
        return info

    def release_controlnet(self) -> None:
        """Free the ControlNet's weights (read again from its file when a control image next needs them)."""
        if self.controlnet is not None:
            self.controlnet.release()

    @property
    def controlnet_loaded(self) -> dict[str, str]:
        """The loaded ControlNet as the engine describes it ({} when none is loaded)."""
        return self.controlnet.loaded() if self.controlnet is not None else {}

    def _controlnet_part(self) -> ControlNetPart:
        if self.controlnet is None:
            raise InvalidArgumentError("a control image needs a ControlNet: Pipeline(controlnet=...) or "
                                       "load_controlnet()")
        if not self.components.vae_has_encoder:
            raise InvalidArgumentError("a control image goes through the VAE encoder, which this VAE file lacks")
        return self.controlnet

    def encode_control(self, image: ImageLike, *, width: int | None = None, height: int | None = None,
                       mask: ImageLike | None = None, init_image: ImageLike | None = None, seed: int = 0,
                       cancel: CancelToken | None = None) -> Latent:
        """A control image to the control latent the ControlNet takes, once for many denoise() calls
        (of this size). ``mask`` and ``init_image`` (inpainting, 2.x ControlNets): their channels too."""
        part = self._controlnet_part()
        pil = as_control_image(image)
        w, h = width or pil.width, height or pil.height
        pil = as_control_image(pil, (w, h))
        init_pil, _, pil_mask = prepare(w, h, init_image, (), mask=mask)
        s = request(prompt="", width=w, height=h, seed=resolve_seed(seed))

        def encode(im: Image.Image) -> Latent:
            return Latent(self.engine.encode_image(s, im, token=cancel), self.family,
                          LATENT_SCALE.get(self.family, 8), s.seed)
        return part.control_latent(encode, pil, mask=pil_mask, init_image=init_pil)

    # -- the request -------------------------------------------------------------------------
    def settings_for(self, prompt: str, **overrides: Any) -> GenerationSettings:
        """The request a call with these keywords makes (any :class:`GenerationSettings` field;
        unset ones from the preset, ``seed`` resolved, the engine's sampler and scheduler filled)."""
        defaults: dict[str, Any] = dict(self.preset.generation_defaults()) if self.preset else {}
        given = {k: v for k, v in overrides.items() if v is not None}
        s = request(**{**defaults, **given, "prompt": prompt, "seed": resolve_seed(overrides.get("seed"))})
        text, negative = self._fit(s.prompt, "prompt"), self._fit(s.negative_prompt, "negative_prompt")
        if (text, negative) != (s.prompt, s.negative_prompt):
            s = dataclasses.replace(s, prompt=text, negative_prompt=negative)
        return self._complete(s)

    def _fit(self, text: str, what: str) -> str:
        """``text`` within ``max_prompt_tokens``: as it is, cut to its longest prefix within the limit
        (a warning; the request then holds what was encoded) or refused, as ``long_prompts`` says.
        Encoding time and memory grow with the square of the tokens: the limit bounds both."""
        limit = self.settings.max_prompt_tokens
        if len(text.encode()) <= limit:                    # a token holds at least one byte
            return text
        count = self._tokens(text)
        if count is None or count <= limit:
            return text
        if self.settings.long_prompts == "refuse":
            raise InvalidArgumentError(f"{what} is {count} tokens; this pipeline takes at most {limit} "
                                       "(max_prompt_tokens; long_prompts='truncate' cuts instead)")
        lo, hi = 0, len(text)
        while lo < hi:                                      # the longest prefix within the limit
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if (self._tokens(text[:mid]) or 0) <= limit else (lo, mid - 1)
        logger.warning("%s: %d tokens, cut to the first %d characters (%d tokens at most: max_prompt_tokens)",
                       what, count, lo, limit)
        return text[:lo]

    def _lora(self, path: str) -> LoraInfo:
        """A LoRA file checked for this pipeline (cached until the file changes)."""
        p = Path(path).expanduser().resolve()
        key = (str(p), stamp(p) if p.is_file() else None)
        if key not in self._loras:
            self._loras[key] = check_lora(p, self.family)
        return self._loras[key]

    def _tokens(self, text: str) -> int | None:
        if text not in self._token_counts:
            if len(self._token_counts) > 256:
                self._token_counts.clear()
            self._token_counts[text] = self.engine.count_tokens(text)
        return self._token_counts[text]

    def _complete(self, s: GenerationSettings) -> GenerationSettings:
        """The sampler and scheduler the engine picks for this model filled in (asked once per
        sampler: later calls need no engine call, so they never wait behind a running one); the
        LoRAs checked, as absolute paths, those of multiplier 0 (which change nothing) left out."""
        if s.cache_mode == "ucache":
            raise InvalidArgumentError("the ucache step cache is for UNet models; these are DiTs (easycache, dbcache, "
                                       "taylorseer, cache-dit or spectrum)")
        if s.slg_scale and self.family == Z_IMAGE:
            raise InvalidArgumentError("skip-layer guidance: the engine's Z-Image DiT skips no layers, so it would "
                                       "change nothing (FLUX.2 Klein has it)")
        if s.hires and s.hires_upscaler.lower().endswith(ESRGAN_SUFFIXES):
            model = Path(s.hires_upscaler).expanduser().resolve()
            inspect(model)                                   # missing or not a model file: a clear error now
            s = dataclasses.replace(s, hires_upscaler=str(model))
        loras = tuple((str(self._lora(path).path), m) for path, m in s.loras if m != 0.0)
        if loras != s.loras:
            s = dataclasses.replace(s, loras=loras)
        if s.sampler is None or s.scheduler is None:
            known = self._engine_defaults.get(s.sampler)
            if known is None:
                known = self._engine_defaults[s.sampler] = self.engine.default_method(s.sampler)
            s = dataclasses.replace(s, sampler=s.sampler or known[0], scheduler=s.scheduler or known[1])
        check_schedule(s, self.family)
        return s

    # -- one-shot generation -----------------------------------------------------------------
    def generate(self, prompt: str, *, init_image: ImageLike | None = None, ref_images: Sequence[ImageLike] = (),
                 mask: ImageLike | None = None, control_image: ImageLike | None = None,
                 progress: ProgressFn | None = None, preview: Preview | None = None,
                 cancel: CancelToken | None = None, **settings: Any) -> GenerationResult:
        """Text (and optionally an init image, with a ``mask`` to inpaint, or reference images) to
        image in one call. ``mask``: one channel, the init image's size; white regenerates.

        ``settings``: any :class:`GenerationSettings` field (``width``, ``steps``, ``seed``, ...);
        unset ones take the preset's defaults, ``seed=None`` draws a random 63-bit seed, reported
        in the result. ``cancel``: a ``threading.Event`` that stops the call when set (it raises
        :class:`Cancelled`). ``preview``: images during sampling. ``control_image``: the
        ControlNet's guide (an edge, depth or pose map, ...), of the image's size (which it sets when
        ``width`` and ``height`` are not given), weighted by ``control_strength``.
        """
        if control_image is not None and settings.get("width") is None and settings.get("height") is None:
            settings["width"], settings["height"] = as_control_image(control_image).size
        s = self.settings_for(prompt, **settings)
        return self.generate_with(s, init_image=init_image, ref_images=ref_images, mask=mask,
                                  control_image=control_image, progress=progress, preview=preview, cancel=cancel)

    __call__ = generate

    def generate_with(self, s: GenerationSettings, *, init_image: ImageLike | None = None,
                      ref_images: Sequence[ImageLike] = (), mask: ImageLike | None = None,
                      control_image: ImageLike | None = None,
                      progress: ProgressFn | None = None, preview: Preview | None = None,
                      cancel: CancelToken | None = None) -> GenerationResult:
        """Generate a complete request (upstream's generate_image).

        With ``release_diffusion`` the same steps run as staged calls (same pixels),
        so the text encoder and the diffusion model are never loaded together."""
        self._require_open()
        self._check_inputs(init_image, ref_images)
        check_ref_images(ref_images)
        init_pil = as_pil(init_image) if init_image is not None else None
        pil_mask = prepare(init_pil.width, init_pil.height, init_pil, (), mask=mask)[2] if init_pil else None
        if mask is not None and init_pil is None:
            raise InvalidArgumentError("a mask needs an init image: it marks what of it to regenerate")
        control_pil = self._control_image(control_image, s, ref_images)
        # inpainting with a 2.x ControlNet: its inpainting channels are made in the staged calls
        inpaint_control = control_pil is not None and pil_mask is not None and self.controlnet is not None \
            and self.controlnet.channels > 16
        start = time.perf_counter()
        with self.engine.operation(cancel):
            s = self._complete(s)
            if self.settings.release_diffusion or inpaint_control:
                images = [item.image for item in self.images(s, init_image=init_image, ref_images=ref_images,
                                                             mask=mask, control_image=control_pil,
                                                             progress=progress, preview=preview)]
                buffers = {} if self.closed else self.engine.all_buffers()   # closed by another thread since
                seconds = time.perf_counter() - start
                skipped = {}
            else:
                if control_pil is not None:
                    self._controlnet_part().ensure()
                images, seconds, buffers, cache = self.engine.generate(s, init_pil, ref_images, pil_mask,
                                                                       control_image=control_pil,
                                                                       progress=progress, preview=preview,
                                                                       token=cancel)
                skipped = _skipped(cache)
        return GenerationResult(images, s, s.seeds(), {"generate_s": seconds, **skipped}, self._weights(buffers))

    # -- staged generation -------------------------------------------------------------------
    def images(self, s: GenerationSettings, *, seeds: Sequence[int] | None = None,
               init_image: ImageLike | None = None, ref_images: Sequence[ImageLike] = (),
               mask: ImageLike | None = None, control_image: ImageLike | None = None,
               progress: ProgressFn | None = None, preview: Preview | None = None,
               cancel: CancelToken | None = None) -> Iterator[ImageItem]:
        """The staged loop, one image at a time as each is decoded: the prompt encoded once
        (cached), the init image resized to the request's size and encoded once (seeded with the
        first seed), references fitted as sd-cli fits them, then denoise and decode per seed.

        With the request's own seeds (``s.seeds()``) the images are those of ``generate_with(s)``."""
        self._check_inputs(init_image, ref_images)
        seeds = list(seeds) if seeds is not None else s.seeds()
        s = self._complete(s)
        init_pil, refs, pil_mask = prepare(s.width, s.height, init_image, ref_images, s.auto_resize_ref_image, mask)
        control_pil = self._control_image(control_image, s, ref_images)
        start = time.perf_counter()
        cond = self.encode(s.prompt, s.negative_prompt if s.cfg_scale != 1.0 else None, loras=s.loras, cancel=cancel)
        encode_s = time.perf_counter() - start
        if s.hires:      # the second pass runs inside generate_image: one call per image
            for seed in seeds:
                t0 = time.perf_counter()
                if control_pil is not None:
                    self._controlnet_part().ensure()
                images, seconds, _, cache = self.engine.generate(s.one(seed), init_pil, refs, pil_mask,
                                                                 control_image=control_pil,
                                                                 progress=progress, preview=preview, token=cancel)
                yield ImageItem(images[0], s.one(seed), None, {"encode_s": 0.0, "denoise_s": seconds,
                                                               "decode_s": 0.0, **_skipped(cache)})
            return
        init = None if init_pil is None else self.encode_image(init_pil, seed=seeds[0], width=s.width,
                                                               height=s.height, cancel=cancel)
        control = None if control_pil is None else self.encode_control(
            control_pil, width=s.width, height=s.height, mask=pil_mask, init_image=init_pil, seed=seeds[0],
            cancel=cancel)
        for i, seed in enumerate(seeds):
            one = s.one(seed)
            latent = self._denoise(cond, one, init_latent=init, ref_images=refs, mask=pil_mask, control=control,
                                   progress=progress, preview=preview, cancel=cancel)
            t0 = time.perf_counter()
            image = self._decode(latent, s, cancel)
            timings = {"encode_s": encode_s if i == 0 else 0.0, "denoise_s": latent.info["denoise_s"],
                       "decode_s": time.perf_counter() - t0}
            timings.update(_skipped(latent.info["cache"]))
            yield ImageItem(image, one, latent, timings)

    def sweep(self, prompt: str, *, negative_prompt: str = "", seeds: Sequence[int | None] = (None,),
              steps: Sequence[int | None] = (None,), sizes: Sequence[tuple[int, int] | None] = (None,),
              cfg_scales: Sequence[float | None] = (None,), samplers: Sequence[str | None] = (None,),
              schedulers: Sequence[str | None] = (None,), progress: ProgressFn | None = None) -> SweepResult:
        """An image for every combination of the given values, through the staged loop (one
        encoding of the prompt; one more with its negative if some cfg differs from 1)."""
        start = time.perf_counter()
        items = [item for size, n, cfg, sampler, scheduler, seed in itertools.product(
                     sizes, steps, cfg_scales, samplers, schedulers, seeds)
                 for item in self.images(self.settings_for(
                     prompt, negative_prompt=negative_prompt, width=size[0] if size else None,
                     height=size[1] if size else None, steps=n, cfg_scale=cfg, sampler=sampler,
                     scheduler=scheduler, seed=seed), progress=progress)]
        cond = self.encode(prompt, negative_prompt if items[0].settings.cfg_scale != 1.0 else None)   # cached
        return SweepResult(items, cond, {"encode_s": sum(i.timings["encode_s"] for i in items),
                                         "wall_s": time.perf_counter() - start})

    def encode(self, prompt: str, negative_prompt: str | None = None, *, loras: Sequence[Any] = (),
               use_cache: bool = True, cancel: CancelToken | None = None) -> Conditioning:
        """Encode a prompt (and, if given, a negative prompt) once for many denoise() calls.

        A negative encoding is needed for ``cfg_scale != 1``; pass ``negative_prompt=""``
        for the empty one that ``generate()`` uses. ``loras``: those of the request (the ones
        that change the text encoder apply here). Results are cached by prompt, encoder and those
        LoRAs (by content).
        """
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise TypeError(f"negative_prompt must be a str or None, not {type(negative_prompt).__name__}")
        s = request(prompt=prompt, negative_prompt=negative_prompt or "", loras=loras)   # checked, then counted
        prompt = self._fit(prompt, "prompt")
        negative_prompt = None if negative_prompt is None else self._fit(negative_prompt, "negative_prompt")
        encoder_loras = tuple((str(info.path), m) for info, m in ((self._lora(p), m) for p, m in s.loras)
                              if info.encoder and m != 0.0)
        key = (prompt, negative_prompt, self.encoder_id, tuple((identity(Path(p)), m) for p, m in encoder_loras))
        if use_cache:
            hit = self.encodings.get(key)
            if hit is not None:
                return hit
        # merged LoRAs: the call takes the request's whole set, so the weights stay merged for its denoise
        merged = self.settings.lora_apply_mode == "immediately"
        s = request(prompt=prompt, negative_prompt=negative_prompt or "",
                    loras=tuple((str(self._lora(p).path), m) for p, m in s.loras if m != 0.0) if merged
                    else encoder_loras)
        parts, seconds = self.engine.encode(s, negative_prompt is not None, token=cancel)
        cond = Conditioning(dict(parts), self.family, self.encoder_id, prompt, negative_prompt, seconds)
        if use_cache:
            self.encodings.put(key, cond)
        return cond

    def denoise(self, conditioning: Conditioning, *, init_latent: Latent | None = None,
                noise: np.ndarray | None = None, ref_images: Sequence[ImageLike] = (), mask: ImageLike | None = None,
                control: Latent | None = None, progress: ProgressFn | None = None, preview: Preview | None = None,
                cancel: CancelToken | None = None, **settings: Any) -> Latent:
        """Sample one latent from a conditioning, as generate() samples it for the same seed.
        ``settings``: :class:`GenerationSettings` fields, as for generate(); ``mask`` (with
        ``init_latent``, of its pixel size): white regenerates, black keeps the init latent.
        ``control``: a control latent (:meth:`encode_control`) of the request's size."""
        check_conditioning(conditioning, self.family, self.components.dit_context_dim)
        if conditioning.encoder != self.encoder_id:
            logger.warning("conditioning comes from another text encoder (%s)", conditioning.encoder)
        if init_latent is not None:
            check_latent(init_latent, self.family)
            settings["width"] = settings.get("width") or init_latent.width
            settings["height"] = settings.get("height") or init_latent.height
        s = self.settings_for(conditioning.prompt, **{**settings, "negative_prompt": conditioning.negative_prompt})
        if mask is not None and init_latent is None:
            raise InvalidArgumentError("a mask needs an init latent: it marks what of it to regenerate")
        pil_mask = as_mask(mask, (s.width, s.height)) if mask is not None else None
        return self._denoise(conditioning, s, init_latent=init_latent, noise=noise, ref_images=ref_images,
                             mask=pil_mask, control=control, progress=progress, preview=preview, cancel=cancel)

    def _denoise(self, conditioning: Conditioning, s: GenerationSettings, *, init_latent: Latent | None = None,
                 noise: np.ndarray | None = None, ref_images: Sequence[ImageLike] = (), mask: Image.Image | None = None,
                 control: Latent | None = None, progress: ProgressFn | None = None, preview: Preview | None = None,
                 cancel: CancelToken | None = None) -> Latent:
        self._check_inputs(None, ref_images)
        if control is not None:
            check_control_latent(control, s, self._controlnet_part().channels, bool(ref_images))
            self._controlnet_part().ensure()
        if s.cfg_scale != 1.0 and not conditioning.has_negative:
            raise InvalidArgumentError("cfg_scale != 1 needs a negative encoding: encode(prompt, negative_prompt='')")
        check_ref_images(ref_images)
        if noise is not None:
            noise = np.asarray(noise)
            if noise.dtype.kind != "f":
                raise TypeError("noise must be a float array")
            if not np.isfinite(noise).all():
                raise InvalidArgumentError("noise holds NaN or infinite values")
        data, seconds, cache = self.engine.denoise(s, list(conditioning.parts.items()),
                                            init_latent.data if init_latent is not None else None, noise,
                                            list(ref_images), mask, control=None if control is None else control.data,
                                            progress=progress, preview=preview, token=cancel)
        return Latent(data, self.family, LATENT_SCALE.get(self.family, 8), s.seed,
                      {"settings": s, "denoise_s": seconds, "cache": cache})

    @overload
    def decode(self, latent: Latent, *, output_type: Literal["pil"] = ..., cancel: CancelToken | None = None,
               **tiling: Any) -> Image.Image: ...

    @overload
    def decode(self, latent: Latent, *, output_type: Literal["np"], cancel: CancelToken | None = None,
               **tiling: Any) -> np.ndarray: ...

    def decode(self, latent: Latent, *, output_type: str = "pil", cancel: CancelToken | None = None,
               **tiling: Any) -> Image.Image | np.ndarray:
        """Latent to image: a PIL image, or with ``output_type="np"`` a uint8 array (H, W, 3).

        ``tiling``: the request's VAE fields (``vae_tiling=True``: decode in tiles, less memory at
        large sizes; ``vae_tile_size``, ``vae_tile_overlap``, ``vae_relative_tile_size``)."""
        if output_type not in ("pil", "np"):
            raise InvalidArgumentError("output_type must be 'pil' or 'np'")
        unknown = set(tiling) - {f for f in request_fields() if f.startswith("vae_")}
        if unknown:
            raise TypeError(f"decode() takes the request's VAE fields, not {', '.join(sorted(unknown))}")
        pil = self._decode(latent, request(prompt="", **tiling), cancel)
        return pil if output_type == "pil" else np.asarray(pil)

    def _decode(self, latent: Latent, s: GenerationSettings, cancel: CancelToken | None = None) -> Image.Image:
        """The latent to an image as the request decodes it (its VAE tiling), at the latent's size."""
        check_latent(latent, self.family)
        s = dataclasses.replace(s, width=latent.width, height=latent.height, batch_count=1)
        return self.engine.decode(s, latent.data, token=cancel)

    def encode_image(self, image: ImageLike, *, seed: int = 0, width: int | None = None,
                     height: int | None = None, cancel: CancelToken | None = None) -> Latent:
        """Image to latent (the VAE encoder), seeded as generate() seeds an init image's encoding."""
        pil = as_pil(image)
        self._check_inputs(pil, ())
        s = request(prompt="", width=width or pil.width, height=height or pil.height, seed=resolve_seed(seed))
        data = self.engine.encode_image(s, pil, token=cancel)
        return Latent(data, self.family, LATENT_SCALE.get(self.family, 8), s.seed)

    def _control_image(self, image: ImageLike | None, s: GenerationSettings,
                       ref_images: Sequence[ImageLike]) -> Image.Image | None:
        if image is None:
            return None
        self._controlnet_part()
        if ref_images:
            raise InvalidArgumentError("the Z-Image ControlNet does not run with reference images")
        if s.hires:
            raise InvalidArgumentError("the Z-Image ControlNet does not run with the hires fix (its second pass "
                                       "is at another size than the control image)")
        return as_control_image(image, (s.width, s.height))

    def _check_inputs(self, init_image: ImageLike | None, ref_images: Sequence[ImageLike]) -> None:
        if isinstance(ref_images, (Image.Image, np.ndarray)):
            raise TypeError("ref_images must be a sequence of images")
        if not self.components.vae_has_encoder and (init_image is not None or ref_images):
            what = "an init image (img2img)" if init_image is not None else "reference images"
            raise InvalidArgumentError(f"{what} needs the VAE encoder, and {self.paths['vae'] or self.paths['model']} "
                                       "is a decode-only VAE: give a VAE file with encoder weights")

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        where = ", isolated" if self.engine.isolated else ""
        return f"<Pipeline {self.family} {state}{where} device={self.device} threads={self.settings.n_threads}>"


def _skipped(cache: dict[str, int]) -> dict[str, float]:
    """A step cache's report as a result's timing (none when no cache ran)."""
    return {"cache_skipped_steps": float(cache["skipped"])} if "skipped" in cache else {}


def _path(p: PathLike | None) -> Path | None:
    if p is None:
        return None
    if not isinstance(p, (str, Path)):
        raise TypeError(f"model paths must be str or Path, not {type(p).__name__}")
    return Path(p).expanduser().resolve()
