"""The values a generation is made of. :class:`GenerationSettings` is *the request*: built
once at the public edge and handed unchanged to the Engine, whose marshalling writes it into
the engine's structs. Every face reads its format through :func:`parse_request` (keys and
types from the dataclass's fields). No native library needed here.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import secrets
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .errors import InvalidArgumentError
from .weights import REPACK_CHOICES, UPCAST_CHOICES, UPCAST_TYPES

ProgressFn = Callable[[int, int, float], None]      # (step, steps, seconds per step)
PreviewFn = Callable[[int, np.ndarray], None]      # (step, uint8 image of shape (H, W, 3))
MAX_SIDE = 4096                 # pixels per side
MAX_PIXELS = 4096 * 4096        # per image
MAX_STEPS = 1000
MAX_BATCH = 64
SEED_RANGE = (0, 2**63 - 1)

# The engine's names, in its enum order (tests/test_lib_types.py checks them against the library).
SAMPLERS = ("euler", "euler_a", "heun", "dpm2", "dpm++2s_a", "dpm++2m", "dpm++2mv2", "ipndm", "ipndm_v", "lcm",
            "ddim_trailing", "tcd", "res_multistep", "res_2s", "er_sde")
SCHEDULERS = ("discrete", "karras", "exponential", "ays", "gits", "sgm_uniform", "simple", "smoothstep",
              "kl_optimal", "lcm", "bong_tangent")
RNG_TYPES = ("std_default", "cuda", "cpu")
# Weight types the engine can convert any weight to at load (wtype, tensor_type_rules): float
# types and the quantizations ggml makes without an importance matrix. Others that ggml names
# (integer types, q8_1/q8_K, the IQ family) divide by zero or fail an assert in the conversion.
WEIGHT_TYPES = ("f32", "f16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_K", "q3_K", "q4_K", "q5_K", "q6_K",
                "bf16")


def _choice(what: str, value: str | None, allowed: tuple[str, ...]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, not {type(value).__name__}")
    v = value.lower()
    for a in allowed:
        if a.lower() == v:
            return a
    raise InvalidArgumentError(f"unknown {what} {value!r}; choose one of: {', '.join(allowed)}")


def _int(what: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise InvalidArgumentError(f"{what} must be in [{lo}, {hi}], got {value}")
    return value


def _float(what: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, not {type(value).__name__}")
    v = float(value)
    if not (math.isfinite(v) and lo <= v <= hi):
        raise InvalidArgumentError(f"{what} must be a finite number in [{lo}, {hi}], got {value}")
    return v


def default_threads() -> int:
    """Threads the engine uses by default: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# boolean fields of ContextSettings that are sd_ctx_params_t fields of the same name
ENGINE_FLAGS = ("flash_attn", "diffusion_flash_attn", "enable_mmap", "offload_params_to_cpu",
                "keep_clip_on_cpu", "keep_vae_on_cpu", "vae_conv_direct", "diffusion_conv_direct",
                "tae_preview_only", "circular_x", "circular_y")


@dataclass(frozen=True)
class ContextSettings:
    """How a context loads and runs its models (``sd_ctx_params_t``)."""

    n_threads: int = field(default_factory=default_threads)
    wtype: str | None = None          # convert all weights at load, e.g. "f16"; None: see upcast
    upcast: str = "auto"                 # expand quantized weights at load: auto | none | diffusion | all
    upcast_type: str = "auto"            # to what: auto (BF16 where the CPU has native BF16, else F16) | f16 | bf16
    repack: str = "auto"                 # CPU: Q4_0/Q4_K/IQ4_NL/MXFP4 weights in ggml's repacked layout, or "none"
    tensor_type_rules: str | None = None  # the engine's own "regex=type,..." rules, tried before upcast's
    vae_weights: str = "f16"             # the VAE's convolution weights: f16 (as sd-cli) | bf16 (CPU: BF16 matmuls)
    flash_attn: bool = False             # in every model (0.88x at 512x512 on SPR, 1.1x at 1 MP on Zen 4)
    diffusion_flash_attn: bool = False   # flash attention in the diffusion model only
    bf16_attention: bool = True          # CPU modules with AVX512_BF16: unmasked attention on BF16 flash
    #                                      tiles (2.4-4.3x, no L x L matrix); False: the F32 K.Q path
    enable_mmap: bool = False
    offload_params_to_cpu: bool = False
    keep_clip_on_cpu: bool = False
    keep_vae_on_cpu: bool = False
    vae_conv_direct: bool = False        # GPU backends: ggml's direct conv (the CPU always runs its own)
    diffusion_conv_direct: bool = False
    tae_preview_only: bool = False       # with a taesd file: TAE previews, the full VAE for the image
    circular_x: bool = False             # seamless across the left/right edges (tiling textures)
    circular_y: bool = False             # seamless across the top/bottom edges
    rng: str = "cuda"                    # the engine's default noise generator
    sampler_rng: str | None = None    # None: same as rng
    backend: str = "auto"                # "auto" (the engine's choice: a GPU if any), "cpu" or "vulkan"
    device: int | str | None = None  # Vulkan device index, or a device name ("Vulkan1")
    release_encoder: bool = False        # text encoder loaded only while encoding (reloaded on demand)
    release_diffusion: bool = False      # diffusion model released while the text encoder works
    lora_apply_mode: str = "auto"        # auto (= at_runtime) | at_runtime | immediately (merged; repack="none")
    max_prompt_tokens: int = 512         # per prompt: diffusers' max_sequence_length for both models
    long_prompts: str = "truncate"       # over max_prompt_tokens: "truncate" (with a warning) or "refuse"

    def __post_init__(self) -> None:
        _int("n_threads", self.n_threads, 1, 1024)
        object.__setattr__(self, "wtype", _choice("weight type", self.wtype, WEIGHT_TYPES))
        object.__setattr__(self, "rng", _choice("rng", self.rng, RNG_TYPES))
        object.__setattr__(self, "upcast", _choice("upcast", self.upcast or "none", UPCAST_CHOICES))
        object.__setattr__(self, "upcast_type", _choice("upcast_type", self.upcast_type or "auto", UPCAST_TYPES))
        object.__setattr__(self, "repack", _choice("repack", self.repack or "none", REPACK_CHOICES))
        if self.tensor_type_rules is not None:
            object.__setattr__(self, "tensor_type_rules", check_type_rules(self.tensor_type_rules))
        object.__setattr__(self, "backend", _choice("backend", self.backend, ("auto", "cpu", "vulkan")))
        if self.device is not None and (isinstance(self.device, bool) or not isinstance(self.device, (int, str))):
            raise TypeError("device must be an int index, a device name or None")
        object.__setattr__(self, "sampler_rng", _choice("rng", self.sampler_rng, RNG_TYPES))
        _int("max_prompt_tokens", self.max_prompt_tokens, 1, 1 << 20)
        object.__setattr__(self, "lora_apply_mode", _choice("lora_apply_mode", self.lora_apply_mode,
                                                            ("auto", "at_runtime", "immediately")))
        if self.lora_apply_mode == "immediately" and self.repack != "none":
            raise InvalidArgumentError("lora_apply_mode='immediately' merges LoRAs into the weights, which repacked "
                                       "weights cannot take: use it with repack='none' (or 'at_runtime')")
        object.__setattr__(self, "long_prompts", _choice("long_prompts", self.long_prompts, ("truncate", "refuse")))
        for name in ENGINE_FLAGS + ("bf16_attention", "release_encoder", "release_diffusion"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool")
        object.__setattr__(self, "vae_weights", _choice("vae_weights", self.vae_weights or "f16", ("f16", "bf16")))
        if self.lora_apply_mode == "immediately" and (self.release_encoder or self.release_diffusion):
            raise InvalidArgumentError("lora_apply_mode='immediately' merges LoRAs into the weights, which "
                                       "release_encoder/release_diffusion free between calls (use 'at_runtime')")


PREVIEW_MODES = ("proj", "tae", "vae")


@dataclass(frozen=True)
class Preview:
    """Preview images during sampling: ``fn(step, image)`` with an ``uint8`` (H, W, 3) array.

    ``mode``: "proj" (a linear projection of the latent: nearly free, low detail),
    "tae" (the tiny autoencoder: needs a ``taesd`` file) or "vae" (the full VAE:
    as slow as a decode). ``interval``: every how many steps ``fn`` is called (the pinned
    engine makes a preview at every step regardless). ``noisy``: preview the model's
    noisy input instead of its denoised estimate. An exception from ``fn`` stops
    the call, as one from a progress callback does.
    """

    fn: PreviewFn
    mode: str = "proj"
    interval: int = 1
    noisy: bool = False

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError("Preview.fn must be a callable(step, image)")
        if self.mode not in PREVIEW_MODES:
            raise InvalidArgumentError(f"preview mode {self.mode!r}: one of {', '.join(PREVIEW_MODES)}")
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise TypeError("Preview.interval must be an int >= 1")


class TqdmProgress:
    """A progress callback drawing a tqdm bar (``progress=True``); ``close()`` ends the bar."""

    def __init__(self, desc: str = "sampling", file: Any = None) -> None:
        self.desc, self.file = desc, file
        self.bar: Any = None

    def __call__(self, step: int, steps: int, seconds: float) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=steps, desc=self.desc, unit="step", file=self.file)
        self.bar.update(max(0, min(step, steps) - self.bar.n))
        self.bar.set_postfix_str(f"{seconds:.2f} s/step" if seconds >= 1 else f"{1 / max(seconds, 1e-9):.2f} step/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def check_type_rules(rules: Any) -> str:
    """The engine's ``regex=type,...`` rules, each regex compiled and each type convertible."""
    if not isinstance(rules, str):
        raise TypeError("tensor_type_rules must be a str like '^model\\.diffusion_model\\.=f16'")
    out = []
    for item in filter(None, (r.strip() for r in rules.split(","))):
        pattern, sep, type_name = item.rpartition("=")
        if not sep or not pattern:
            raise InvalidArgumentError(f"tensor_type_rules: {item!r} is not 'regex=type'")
        try:
            re.compile(pattern)
        except re.error as e:
            raise InvalidArgumentError(f"tensor_type_rules: bad regular expression {pattern!r}: {e}") from None
        out.append(f"{pattern}={_choice('weight type', type_name, WEIGHT_TYPES)}")
    return ",".join(out)


def parse_size(v: Any) -> tuple[int, int]:
    """A size as faces write it: "WIDTHxHEIGHT" (ASCII digits) or a pair of ints."""
    if isinstance(v, str):
        w, sep, h = v.strip().lower().partition("x")
        if sep and all(x.isascii() and x.isdigit() and len(x) <= 5 for x in (w, h)):
            return int(w), int(h)
    elif isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) for x in v):
        return int(v[0]), int(v[1])
    raise InvalidArgumentError(f"size {str(v)[:40]!r}: expected WIDTHxHEIGHT, e.g. 1024x576")


def seed_range(text: str, limit: int, where: str = "seed range") -> list[int]:
    """The seeds ``A:B`` names, A to B inclusive (0 <= A <= B, at most ``limit`` of them)."""
    a, sep, b = str(text).partition(":")
    lo, hi = (int(x) if x.strip().isascii() and x.strip().isdigit() else -1 for x in (a, b))
    if not sep or not 0 <= lo <= hi <= SEED_RANGE[1] or hi - lo >= limit:
        raise InvalidArgumentError(f"{where} {text!r}: not A:B with 0 <= A <= B, or empty, or over {limit} seeds")
    return list(range(lo, hi + 1))


def resolve_seed(seed: int | None) -> int:
    """A seed in [0, 2**63 - 1]; ``None`` or -1 draws one from the full range."""
    if seed is None or (isinstance(seed, int) and not isinstance(seed, bool) and seed == -1):
        return secrets.randbits(63)
    return _int("seed", seed, *SEED_RANGE)


@dataclass(frozen=True)
class GenerationSettings:
    """The request: everything one generation uses; ``seed`` is the first image's seed."""

    prompt: str
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    steps: int = 8
    cfg_scale: float = 1.0
    sampler: str | None = None        # None: the model's default
    scheduler: str | None = None      # None: the model's default
    seed: int = 0
    batch_count: int = 1
    flow_shift: float | None = None   # None: the model's default
    guidance: float | None = None     # distilled guidance; None: engine default
    sigmas: tuple[float, ...] | None = None  # custom schedule (steps + 1 values); overrides steps
    strength: float = 0.75               # img2img: how much of the schedule runs on the init image
    control_strength: float = 0.9        # a ControlNet's hints are added times this (sd-cli's default)
    vae_tiling: bool = False             # decode in tiles (the engine's default tile size and overlap)
    loras: tuple[tuple[str, float], ...] = ()   # (LoRA file, multiplier) pairs, applied together
    eta: float | None = None             # ancestral samplers' noise (None: the engine's default)
    slg_scale: float | None = None       # skip-layer guidance (FLUX.2; the Z-Image DiT skips no layers)
    skip_layers: tuple[int, ...] | None = None   # the blocks it skips
    skip_layer_start: float | None = None        # the part of the schedule it runs in
    skip_layer_end: float | None = None
    vae_tile_size: tuple[int, int] | None = None           # VAE tiles in latent cells (with vae_tiling)
    vae_tile_overlap: float | None = None                  # their overlap, a fraction of a tile
    vae_relative_tile_size: tuple[float, float] | None = None   # or tiles as a fraction of the latent
    auto_resize_ref_image: bool = True   # fit references to the image (sd-cli's default); else as given
    cache_mode: str | None = None        # a step cache: easycache, dbcache, taylorseer, cache-dit, spectrum
    cache_options: str | None = None     # sd-cli's --cache-option "key=value,..." for that mode
    scm_mask: str | None = None          # cache-dit's steps mask "1,1,0,..." (1: compute, 0: may cache)
    scm_policy: str = "dynamic"          # or "static"
    hires: bool = False                  # hires fix: a second pass at a larger size
    hires_upscaler: str = "Latent"       # one of HIRES_UPSCALERS, or an ESRGAN file (.pth/.safetensors/.gguf)
    hires_scale: float = 2.0             # the second pass's size: the first's times this ...
    hires_width: int = 0                 # ... unless a target is given (one side: square)
    hires_height: int = 0
    hires_steps: int = 0                 # 0: the request's steps
    hires_denoising_strength: float = 0.7
    hires_upscale_tile_size: int = 128   # an ESRGAN upscaler's tiles

    def __post_init__(self) -> None:
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a str, not {type(getattr(self, name)).__name__}")
            if re.search("[\0\ud800-\udfff]", getattr(self, name)):   # the engine cuts at NUL; no UTF-8 for these
                raise InvalidArgumentError(f"{name} holds a NUL character or a lone surrogate: not text to encode")
        for name in ("width", "height"):
            v = _int(name, getattr(self, name), 16, MAX_SIDE)
            if v % 16:
                raise InvalidArgumentError(f"{name} must be a multiple of 16, got {v}")
        if self.width * self.height > MAX_PIXELS:
            raise InvalidArgumentError(f"{self.width}x{self.height} is over {MAX_PIXELS} pixels")
        _int("steps", self.steps, 1, MAX_STEPS)
        object.__setattr__(self, "cfg_scale", _float("cfg_scale", self.cfg_scale, 0.0, 100.0))
        object.__setattr__(self, "sampler", _choice("sampler", self.sampler, SAMPLERS))
        object.__setattr__(self, "scheduler", _choice("scheduler", self.scheduler, SCHEDULERS))
        _int("seed", self.seed, *SEED_RANGE)
        _int("batch_count", self.batch_count, 1, MAX_BATCH)
        if self.seed + self.batch_count - 1 > SEED_RANGE[1]:
            raise InvalidArgumentError("seed + batch_count - 1 overflows the 63-bit seed range")
        if self.flow_shift is not None:
            object.__setattr__(self, "flow_shift", _float("flow_shift", self.flow_shift, 1e-3, 100.0))
        if self.guidance is not None:
            object.__setattr__(self, "guidance", _float("guidance", self.guidance, 0.0, 100.0))
        object.__setattr__(self, "strength", _float("strength", self.strength, 0.0, 1.0))
        object.__setattr__(self, "control_strength", _float("control_strength", self.control_strength, 0.0, 2.0))
        if not isinstance(self.vae_tiling, bool):
            raise TypeError("vae_tiling must be a bool")
        object.__setattr__(self, "loras", lora_pairs(self.loras))
        for name, lo, hi in (("eta", 0.0, 100.0), ("slg_scale", -100.0, 100.0), ("skip_layer_start", 0.0, 1.0),
                             ("skip_layer_end", 0.0, 1.0), ("vae_tile_overlap", 0.0, 0.9)):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _float(name, getattr(self, name), lo, hi))
        checks: tuple[tuple[str, Callable[[str, Any], float]], ...] = (
            ("skip_layers", lambda n, v: _int(n, v, 0, 255)), ("vae_tile_size", lambda n, v: _int(n, v, 1, 1024)),
            ("vae_relative_tile_size", lambda n, v: _float(n, v, 0.0, 64.0)))
        for name, check in checks:
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                    raise TypeError(f"{name} must be a sequence of numbers")
                object.__setattr__(self, name, tuple(check(name, v) for v in value))
        for name in ("vae_tile_size", "vae_relative_tile_size"):
            if getattr(self, name) is not None and len(getattr(self, name)) != 2:
                raise InvalidArgumentError(f"{name} is (width, height)")
        if not isinstance(self.auto_resize_ref_image, bool):
            raise TypeError("auto_resize_ref_image must be a bool")
        self._check_hires()
        object.__setattr__(self, "cache_mode", _choice("cache mode", self.cache_mode, CACHE_MODES))
        object.__setattr__(self, "scm_policy", _choice("scm_policy", self.scm_policy, ("dynamic", "static")))
        if self.cache_options is not None:
            cache_options(self.cache_mode, self.cache_options)
        if self.scm_mask is not None and not re.fullmatch(r"[01](,[01])*", str(self.scm_mask)):
            raise InvalidArgumentError(f"scm_mask is comma-separated 0 and 1 (1: compute), not {self.scm_mask!r}")
        if self.sigmas is not None:
            if isinstance(self.sigmas, (str, bytes)) or not hasattr(self.sigmas, "__len__"):
                raise TypeError("sigmas must be a sequence of numbers")
            sig = tuple(_float("sigma", v, 0.0, 1e4) for v in self.sigmas)
            if not 2 <= len(sig) <= MAX_STEPS + 1:
                raise InvalidArgumentError(f"sigmas needs 2 to {MAX_STEPS + 1} values, got {len(sig)}")
            if any(b > a for a, b in zip(sig, sig[1:], strict=False)):
                raise InvalidArgumentError("sigmas must not increase")
            object.__setattr__(self, "sigmas", sig)
            object.__setattr__(self, "steps", len(sig) - 1)

    def _check_hires(self) -> None:
        if not isinstance(self.hires, bool):
            raise TypeError("hires must be a bool")
        if not isinstance(self.hires_upscaler, str) or not self.hires_upscaler:
            raise TypeError("hires_upscaler must be an upscaler's name or an ESRGAN file")
        if not self.hires_upscaler.lower().endswith(ESRGAN_SUFFIXES):
            object.__setattr__(self, "hires_upscaler", _choice("hires upscaler", self.hires_upscaler, HIRES_UPSCALERS))
        object.__setattr__(self, "hires_scale", _float("hires_scale", self.hires_scale, 0.1, 8.0))
        object.__setattr__(self, "hires_denoising_strength",
                           _float("hires_denoising_strength", self.hires_denoising_strength, 1e-4, 1.0))
        _int("hires_steps", self.hires_steps, 0, MAX_STEPS)
        _int("hires_upscale_tile_size", self.hires_upscale_tile_size, 16, 4096)
        for name in ("hires_width", "hires_height"):
            if _int(name, getattr(self, name), 0, MAX_SIDE) % 16:
                raise InvalidArgumentError(f"{name} must be a multiple of 16 (or 0), got {getattr(self, name)}")
        if self.hires:
            w, h = self.output_size
            if w * h > MAX_PIXELS or max(w, h) > MAX_SIDE:
                raise InvalidArgumentError(f"the hires pass's {w}x{h} is over {MAX_SIDE} per side or {MAX_PIXELS} "
                                           "pixels")

    @property
    def output_size(self) -> tuple[int, int]:
        """The images' size: the request's, or the hires pass's (as the engine aligns it, to 16)."""
        if not self.hires:
            return self.width, self.height
        w, h = self.hires_width or self.hires_height, self.hires_height or self.hires_width
        if not w:
            w, h = round(self.width * self.hires_scale), round(self.height * self.hires_scale)
        return max(16, w // 16 * 16), max(16, h // 16 * 16)

    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.batch_count)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def one(self, seed: int) -> GenerationSettings:
        """The request of one image of this one's batch."""
        return dataclasses.replace(self, seed=seed, batch_count=1)


def lora_pairs(value: Any) -> tuple[tuple[str, float], ...]:
    """LoRAs as (path, multiplier) pairs: from pairs, or from "path:multiplier" strings."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise TypeError("loras must be a sequence of (file, multiplier) pairs")
    out = []
    for item in value:
        if isinstance(item, str):
            path, sep, weight = item.rpartition(":")
            item = (path, float(weight)) if sep and _is_number(weight) else (item, 1.0)
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], (str, os.PathLike))
                and str(item[0])):
            raise TypeError(f"a LoRA is a (file, multiplier) pair, not {item!r}")
        out.append((os.fspath(item[0]), _float("LoRA multiplier", item[1], -10.0, 10.0)))
    if len(out) > 16:
        raise InvalidArgumentError(f"at most 16 LoRAs at once, got {len(out)}")
    return tuple(out)


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


HIRES_UPSCALERS = ("None", "Latent", "Latent (nearest)", "Latent (nearest-exact)", "Latent (antialiased)",
                   "Latent (bicubic)", "Latent (bicubic antialiased)", "Lanczos", "Nearest", "Model")
ESRGAN_SUFFIXES = (".pth", ".pt", ".safetensors", ".gguf")
CACHE_MODES = ("easycache", "ucache", "dbcache", "taylorseer", "cache-dit", "spectrum")
# sd-cli's --cache-option keys per mode: the sd_cache_params_t field each sets, and its type
_CACHE_KEYS: dict[str, tuple[str, type]] = {
    "start": ("start_percent", float), "end": ("end_percent", float), "decay": ("error_decay_rate", float),
    "relative": ("use_relative_threshold", bool), "reset": ("reset_error_on_compute", bool),
    "Fn": ("Fn_compute_blocks", int), "Bn": ("Bn_compute_blocks", int), "w": ("spectrum_w", float),
    "m": ("spectrum_m", int), "lam": ("spectrum_lam", float), "window": ("spectrum_window_size", int),
    "flex": ("spectrum_flex_window", float), "stop": ("spectrum_stop_percent", float)}
_CACHE_MODE_KEYS = {"easycache": ("threshold", "start", "end", "decay", "relative", "reset"),
                    "dbcache": ("Fn", "Bn", "threshold", "warmup"),
                    "spectrum": ("w", "m", "lam", "window", "flex", "warmup", "stop")}
_CACHE_MODE_KEYS.update({"ucache": _CACHE_MODE_KEYS["easycache"], "taylorseer": _CACHE_MODE_KEYS["dbcache"],
                         "cache-dit": _CACHE_MODE_KEYS["dbcache"]})


def cache_options(mode: str | None, text: str) -> dict[str, float | int | bool]:
    """sd-cli's --cache-option text as sd_cache_params_t fields (threshold and warmup mean a field of
    the mode's own), checked: keys the mode takes, numbers."""
    if mode is None:
        raise InvalidArgumentError("cache_options need a cache_mode")
    if not isinstance(text, str):
        raise TypeError("cache_options is sd-cli's 'key=value,...' text")
    out: dict[str, float | int | bool] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        key = {"fn": "Fn", "bn": "Bn"}.get(key, key)
        if not sep or key not in _CACHE_MODE_KEYS[mode]:
            raise InvalidArgumentError(f"cache option {item!r}: {mode} takes {', '.join(_CACHE_MODE_KEYS[mode])} "
                                       "(key=value)")
        kind: type
        if key == "threshold":
            field_name, kind = ("reuse_threshold" if mode in ("easycache", "ucache") else "residual_diff_threshold",
                                float)
        elif key == "warmup":
            field_name, kind = ("spectrum_warmup_steps" if mode == "spectrum" else "max_warmup_steps", int)
        else:
            field_name, kind = _CACHE_KEYS[key]
        try:
            number = float(value)
        except ValueError:
            raise InvalidArgumentError(f"cache option {key}: not a number: {value!r}") from None
        if not math.isfinite(number) or abs(number) > 1e6 or (kind is int and not number.is_integer()):
            raise InvalidArgumentError(f"cache option {key}: {value!r} is out of range")
        out[field_name] = number != 0.0 if kind is bool else int(number) if kind is int else number
    return out


# The request class every face builds through (a test may put a subclass with one more field here).
REQUEST: type[GenerationSettings] = GenerationSettings
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def request(**values: Any) -> GenerationSettings:
    """A request from keywords (``InvalidArgumentError``/``TypeError`` for bad ones)."""
    return REQUEST(**values)


def request_fields() -> dict[str, Any]:
    """The request's field names and their value types (``Optional`` unwrapped)."""
    hints = typing.get_type_hints(REQUEST)
    out = {}
    for f in dataclasses.fields(REQUEST):
        kind = hints[f.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
            kind = args[0]
        out[f.name] = kind
    return out


def _from_text(name: str, kind: Any, text: str) -> Any:
    try:
        if kind is bool:
            if text.strip().lower() not in _TRUE + _FALSE:
                raise ValueError(text)
            return text.strip().lower() in _TRUE
        if kind is int:
            t = text.strip()
            if not (t.isascii() and t.lstrip("+-").isdigit() and len(t) <= 20):   # no '²', no 5000 digits
                raise ValueError(text)
            return int(t)
        if kind is float:
            return float(text)
        if typing.get_origin(kind) is tuple and typing.get_args(kind)[0] in (int, float):
            convert = typing.get_args(kind)[0]             # "1,0.5,0", "[7,8,9]", "32x32"
            return tuple(convert(v) for v in re.split(r"[,x\[\] ]+", text.strip()) if v)
        if typing.get_origin(kind) is tuple:          # LoRAs: "file:multiplier,file2:multiplier"
            return tuple(v.strip() for v in text.split(",") if v.strip())
    except ValueError:
        raise InvalidArgumentError(f"{name}: not a valid {getattr(kind, '__name__', 'value')}: {text[:40]!r}") from None
    return text


def parse_request(values: Mapping[str, Any], *, where: str = "request", text: bool = False,
                  aliases: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Request keywords from a face's mapping: each key a field of the request (or an alias of
    one), unset values (None, a table's NaN) dropped, whole floats of int fields made ints, lists
    made tuples, and with ``text`` strings read as the field's type (forms, flags). Values are
    checked when the request is built from them."""
    kinds = request_fields()
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = (aliases or {}).get(key, key)
        if name not in kinds:
            raise InvalidArgumentError(f"{where}: unknown key {key!r} (known: {', '.join(kinds)})")
        kind = kinds[name]
        if value is None or (isinstance(value, float) and value != value):
            continue
        if text and isinstance(value, str) and kind is not str:
            value = _from_text(name, kind, value)
        elif kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        elif isinstance(value, list):
            value = tuple(value)
        out[name] = value
    return out
