"""Values across the FFI, nothing else: requests and context settings into the engine's
structs, arrays as ``sdcpp_tensor_t`` views, images as ``sd_image_t``, results back into numpy,
error codes as exceptions. Builders return the struct and ``keep`` (what it points into); the
Engine calls them on the engine thread, so ``keep`` outlives the native call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ._ffi import ffi, lib, string
from ._images import ImageLike, as_pil
from ._lib_types import CStruct, ShimResult
from .errors import Cancelled, GenerationError, InvalidArgumentError, SdcppError
from .settings import ENGINE_FLAGS, ESRGAN_SUFFIXES, ContextSettings, GenerationSettings, cache_options

PartKey = tuple[int, str, int]  # (role: 0 positive / 1 negative, part name, index)
Keep = list[Any]


def _text(value: str, keep: Keep) -> CStruct:
    keep.append(ffi.new("char[]", value.encode()))
    return keep[-1]


def _at(path: str, convert: Callable[[Any, Keep], Any] | None = None) -> Callable[[CStruct, Any, Keep], None]:
    """A setter of the struct field at ``path`` ("sample_params.guidance.txt_cfg")."""
    *parents, leaf = path.split(".")

    def setter(p: CStruct, value: Any, keep: Keep) -> None:
        for name in parents:
            p = getattr(p, name)
        setattr(p, leaf, convert(value, keep) if convert is not None else value)
    return setter


def _set_sigmas(p: CStruct, sigmas: Sequence[float], keep: Keep) -> None:
    keep.append(ffi.new("float[]", list(sigmas)))
    p.sample_params.custom_sigmas, p.sample_params.custom_sigmas_count = keep[-1], len(sigmas)


def _set_loras(p: CStruct, loras: Sequence[tuple[str, float]], keep: Keep) -> None:
    if not loras:
        return
    array = ffi.new("sd_lora_t[]", len(loras))
    keep.append(array)
    for i, (path, multiplier) in enumerate(loras):
        array[i].path, array[i].multiplier, array[i].is_high_noise = _text(path, keep), multiplier, False
    p.loras, p.lora_count = array, len(loras)


def _set_skip_layers(p: CStruct, layers: Sequence[int], keep: Keep) -> None:
    keep.append(ffi.new("int[]", list(layers)))
    p.sample_params.guidance.slg.layers, p.sample_params.guidance.slg.layer_count = keep[-1], len(layers)


CACHE_MODE_IDS: dict[str, int] = {"easycache": 1, "ucache": 2, "dbcache": 3, "taylorseer": 4, "cache-dit": 5,
                                  "spectrum": 6}        # sd_cache_mode_t


def _set_cache_options(p: CStruct, text: str, keep: Keep) -> None:
    mode = next(name for name, value in CACHE_MODE_IDS.items() if value == p.cache.mode)   # set before: in field order
    for name, value in cache_options(mode, text).items():
        setattr(p.cache, name, value)


def _set_hires_upscaler(p: CStruct, name: str, keep: Keep) -> None:
    if name.lower().endswith(ESRGAN_SUFFIXES):           # a model file: the engine's "Model" upscaler
        p.hires.upscaler, p.hires.model_path = lib.str_to_sd_hires_upscaler(b"Model"), _text(name, keep)
    else:
        p.hires.upscaler = lib.str_to_sd_hires_upscaler(name.encode())


def _pair(x: str, y: str) -> Callable[[CStruct, Any, Keep], None]:
    def setter(p: CStruct, value: Sequence[float], keep: Keep) -> None:
        _at(x)(p, value[0], keep)
        _at(y)(p, value[1], keep)
    return setter


# Each request field -> how it is written into an sd_img_gen_params_t (a None value leaves the
# engine's default). A field without a setter here fails loudly, never silently.
SETTERS: dict[str, Callable[[CStruct, Any, Keep], None]] = {
    "prompt": _at("prompt", _text), "negative_prompt": _at("negative_prompt", _text),
    "width": _at("width"), "height": _at("height"), "seed": _at("seed"), "batch_count": _at("batch_count"),
    "strength": _at("strength"), "steps": _at("sample_params.sample_steps"),
    "control_strength": _at("control_strength"),
    "cfg_scale": _at("sample_params.guidance.txt_cfg"), "guidance": _at("sample_params.guidance.distilled_guidance"),
    "sampler": _at("sample_params.sample_method", lambda v, _: lib.str_to_sample_method(v.encode())),
    "scheduler": _at("sample_params.scheduler", lambda v, _: lib.str_to_scheduler(v.encode())),
    "flow_shift": _at("sample_params.flow_shift"), "sigmas": _set_sigmas,
    "vae_tiling": _at("vae_tiling_params.enabled"), "loras": _set_loras,
    "eta": _at("sample_params.eta"),
    "slg_scale": _at("sample_params.guidance.slg.scale"), "skip_layers": _set_skip_layers,
    "skip_layer_start": _at("sample_params.guidance.slg.layer_start"),
    "skip_layer_end": _at("sample_params.guidance.slg.layer_end"),
    "vae_tile_size": _pair("vae_tiling_params.tile_size_x", "vae_tiling_params.tile_size_y"),
    "vae_tile_overlap": _at("vae_tiling_params.target_overlap"),
    "vae_relative_tile_size": _pair("vae_tiling_params.rel_size_x", "vae_tiling_params.rel_size_y"),
    "auto_resize_ref_image": _at("auto_resize_ref_image"),
    "cache_mode": _at("cache.mode", lambda mode, _: CACHE_MODE_IDS[mode]), "cache_options": _set_cache_options,
    "scm_mask": _at("cache.scm_mask", _text),
    "scm_policy": _at("cache.scm_policy_dynamic", lambda v, _: v == "dynamic"),
    "hires": _at("hires.enabled"), "hires_upscaler": _set_hires_upscaler, "hires_scale": _at("hires.scale"),
    "hires_width": _at("hires.target_width"), "hires_height": _at("hires.target_height"),
    "hires_steps": _at("hires.steps"), "hires_denoising_strength": _at("hires.denoising_strength"),
    "hires_upscale_tile_size": _at("hires.upscale_tile_size"),
}


def image_params(s: GenerationSettings, *, init_image: ImageLike | None = None,
                 ref_images: Sequence[ImageLike] = (), mask: Image.Image | None = None,
                 control_image: ImageLike | None = None) -> tuple[CStruct, Keep]:
    """An ``sd_img_gen_params_t*`` for the request (``sd_img_gen_params_init`` first)."""
    params = ffi.new("sd_img_gen_params_t*")
    lib.sd_img_gen_params_init(params)
    keep: Keep = []
    for f in dataclasses.fields(s):
        value = getattr(s, f.name)
        if value is not None:
            if f.name not in SETTERS:
                raise SdcppError(f"the request field {f.name!r} has no marshalling (_marshal.SETTERS)")
            SETTERS[f.name](params, value, keep)
    if init_image is not None:
        keep.append(fill_image(params.init_image, init_image))
    if mask is not None:
        keep.append(fill_image(params.mask_image, mask, channels=1))
    if control_image is not None:
        keep.append(fill_image(params.control_image, control_image))
    if ref_images:
        refs = ffi.new("sd_image_t[]", len(ref_images))
        keep.append(refs)
        keep.extend(fill_image(refs[i], im) for i, im in enumerate(ref_images))
        params.ref_images, params.ref_images_count = refs, len(ref_images)
    return params, keep


def context_params(paths: dict[str, Path | None], settings: ContextSettings, *, rules: str,
                   vae_decode_only: bool) -> tuple[CStruct, Keep]:
    """An ``sd_ctx_params_t*`` for these files and settings (``sd_ctx_params_init`` first)."""
    p = ffi.new("sd_ctx_params_t*")
    lib.sd_ctx_params_init(p)
    keep: Keep = []
    for name, path in paths.items():
        if path is not None:
            setattr(p, "model_path" if name == "model" else f"{name}_path", _text(str(path), keep))
    p.n_threads = settings.n_threads
    if settings.wtype is not None:
        p.wtype = lib.str_to_sd_type(settings.wtype.encode())
    p.rng_type = lib.str_to_rng_type(settings.rng.encode())
    # auto: at run time, always: merging would change (and, repacked, break) the base weights, and
    # a call without the LoRA after one with it must give the base model's pixels bit for bit
    mode = "at_runtime" if settings.lora_apply_mode == "auto" else settings.lora_apply_mode
    p.lora_apply_mode = lib.str_to_lora_apply_mode(mode.encode())
    if settings.sampler_rng is not None:
        p.sampler_rng_type = lib.str_to_rng_type(settings.sampler_rng.encode())
    for name in ENGINE_FLAGS:
        setattr(p, name, getattr(settings, name))
    if rules:
        p.tensor_type_rules = _text(rules, keep)
    # A resident context serves many calls and img2img: keep everything loaded.
    p.free_params_immediately = False
    p.vae_decode_only = vae_decode_only
    return p, keep


def weight_type_id(wtype: str | None) -> int:
    """The engine's id of a weight type name (``SD_TYPE_COUNT``: keep each tensor's type)."""
    return lib.str_to_sd_type(wtype.encode()) if wtype is not None else lib.SD_TYPE_COUNT


# -- images ------------------------------------------------------------------------------------
def fill_image(struct: CStruct, image: ImageLike, channels: int = 3) -> tuple[np.ndarray, CStruct]:
    """Point an ``sd_image_t`` at an RGB (or, ``channels=1``, a gray) copy of ``image``; returns what
    must stay alive."""
    pil = as_pil(image) if channels == 3 else image.convert("L") if isinstance(image, Image.Image) else image
    rgb = np.ascontiguousarray(np.asarray(pil), dtype=np.uint8)
    buf = ffi.from_buffer(rgb)
    struct.width, struct.height, struct.channel = rgb.shape[1], rgb.shape[0], channels
    struct.data = ffi.cast("uint8_t*", buf)
    return (rgb, buf)


def to_pil(img: CStruct) -> Image.Image:
    w, h, c = img.width, img.height, img.channel
    if img.data == ffi.NULL or c not in (1, 3, 4):
        raise GenerationError(f"engine returned an empty image ({w}x{h}x{c})")
    arr = np.frombuffer(ffi.buffer(img.data, w * h * c), dtype=np.uint8).reshape(h, w, c).copy()
    return Image.fromarray(arr[:, :, 0] if c == 1 else arr)


# -- tensors -----------------------------------------------------------------------------------
class TensorViews:
    """``sdcpp_tensor_t`` views over numpy arrays, alive as long as this object."""

    def __init__(self, items: list[tuple[PartKey, np.ndarray]]) -> None:
        self.arrays: list[np.ndarray] = []
        self.names: list[CStruct] = []
        self.views = ffi.new("sdcpp_tensor_t[]", max(len(items), 1))
        self.count = len(items)
        for i, ((role, part, index), array) in enumerate(items):
            is_int = array.dtype.kind in "iu"
            a = np.ascontiguousarray(array, dtype=np.int32 if is_int else np.float32)
            if not 1 <= a.ndim <= 5:
                raise InvalidArgumentError(f"{part}: arrays of 1 to 5 dimensions expected, got {a.ndim}")
            name = ffi.new("char[]", part.encode())
            v = self.views[i]
            v.role, v.part, v.index, v.is_int32, v.ndim = role, name, index, int(is_int), a.ndim
            for d, n in enumerate(reversed(a.shape)):
                v.ne[d] = n
            v.data = ffi.from_buffer(a)
            self.arrays.append(a)
            self.names.append(name)

    @property
    def first(self) -> CStruct:
        """The ``sdcpp_tensor_t*`` of the first view (NULL when there is none)."""
        return self.views if self.count else ffi.NULL


def read_result(result: ShimResult) -> list[tuple[PartKey, np.ndarray]]:
    """Copy every tensor of an ``sdcpp_result_t*`` into numpy, then free it."""
    try:
        out: list[tuple[PartKey, np.ndarray]] = []
        view = ffi.new("sdcpp_tensor_t*")
        for i in range(lib.sdcpp_result_count(result)):
            if lib.sdcpp_result_get(result, i, view) != 0:
                raise SdcppError(string(lib.sdcpp_last_error()))
            shape = tuple(reversed([view.ne[d] for d in range(view.ndim)]))
            dtype = np.int32 if view.is_int32 else np.float32
            count = int(np.prod(shape))
            a = np.frombuffer(ffi.buffer(view.data, count * 4), dtype=dtype).reshape(shape).copy()
            out.append(((view.role, ffi.string(view.part).decode(), view.index), a))
        return out
    finally:
        lib.sdcpp_result_free(result)


def check(rc: int, error_type: type[SdcppError] = SdcppError) -> None:
    """Raise the shim's per-thread message when a call failed."""
    if rc != 0:
        message = string(lib.sdcpp_last_error()) or "native call failed"
        raise {-2: InvalidArgumentError, -3: Cancelled}.get(rc, error_type)(message)
