"""Synthetic Z-Image-Turbo Fun ControlNet Union files, in the published layouts.

Tensor names are diffusers' ``ZImageControlNetModel`` (separate ``to_q``/``to_k``/``to_v``), as the
published safetensors name them. The files do not store where the control blocks sit; the engine
(and :func:`control_places`) puts ``n`` control blocks at every ``layers / n``-th DiT layer:

- ``"1.0"``: a block every 5 layers (6 on the 30-layer DiT), 16 control channels (the control
  image's latent), plain ``control_noise_refiner`` blocks that give no hints;
- ``"2.0"``: a block every 2 layers (15), 33 control channels (latent, 1 - inpaint mask,
  inpaint latent), ``control_noise_refiner`` blocks left at their zero initialisation (the
  refiner's hints come from ``control_layers``);
- ``"2.1"``: as 2.0 with trained ``control_noise_refiner`` blocks (non-zero ``before_proj``).
"""

from __future__ import annotations

from pathlib import Path

from .layouts import TensorSpec, ZImageDiTConfig, family_config, zimage_block
from .writer import MetaValue, file_size, plan_tensors, write_file

CONTROLNET_VARIANTS = ("1.0", "2.0", "2.1")


def control_channels(variant: str) -> int:
    """Control channels of a variant: 16 (latent) for 1.0, 33 (latent, mask, inpaint latent) for 2.x."""
    return 16 if _check(variant) == "1.0" else 33


def control_places(variant: str, layers: int) -> list[int]:
    """The DiT layers the control blocks sit beside: every 5th (1.0) or 2nd (2.x), the step
    shortened until it divides ``layers`` (small test models)."""
    step = 5 if _check(variant) == "1.0" else 2
    while layers % step:
        step -= 1
    return list(range(0, layers, step))


def _check(variant: str) -> str:
    if variant not in CONTROLNET_VARIANTS:
        raise ValueError(f"unknown ControlNet variant {variant!r}; allowed: {', '.join(CONTROLNET_VARIANTS)}")
    return variant


def _block(prefix: str, hidden: int, *, before: str | None, after: str | None) -> list[TensorSpec]:
    """A modulated Z-Image block in diffusers' names (+ before_proj / after_proj of kind ``before``
    / ``after``: "w" random, "zero")."""
    specs = zimage_block(prefix, hidden, modulation=True, diffusers_names=True)
    for name, kind in (("before_proj", before), ("after_proj", after)):
        if kind is not None:
            specs += [TensorSpec(f"{prefix}.{name}.weight", (hidden, hidden), kind),
                      TensorSpec(f"{prefix}.{name}.bias", (hidden,), "vec" if kind == "w" else "zero")]
    return specs


def controlnet_layout(variant: str = "2.1", dit: ZImageDiTConfig | None = None) -> list[TensorSpec]:
    """The tensors of a ControlNet Union ``variant`` for a DiT of ``dit``'s sizes (default: Z-Image-Turbo's)."""
    _check(variant)
    dit = dit or ZImageDiTConfig()
    dit.validate()
    h = dit.hidden
    specs = [TensorSpec("control_all_x_embedder.2-1.weight", (h, 4 * control_channels(variant)), "w"),
             TensorSpec("control_all_x_embedder.2-1.bias", (h,), "vec")]
    for i, _ in enumerate(control_places(variant, dit.layers)):
        specs += _block(f"control_layers.{i}", h, before="w" if i == 0 else None, after="w")
    for i in range(dit.refiner_layers):
        prefix = f"control_noise_refiner.{i}"
        if variant == "1.0":
            specs += _block(prefix, h, before=None, after=None)
        elif variant == "2.0":   # never trained: the zero initialisation of its projections
            specs += _block(prefix, h, before="zero" if i == 0 else None, after="zero")
        else:
            specs += _block(prefix, h, before="w" if i == 0 else None, after="w")
    return specs


def controlnet_filename(variant: str = "2.1", *, size: str = "tiny", wtype: str = "f16", seed: int = 0,
                        fmt: str = "safetensors") -> str:
    """e.g. ``z-image-turbo-controlnet-2.1-tiny-f16-s0.safetensors``."""
    return f"z-image-turbo-controlnet-{_check(variant)}-{size}-{wtype}-s{seed}.{fmt}"


def write_controlnet(out_dir: str | Path, variant: str = "2.1", *, size: str = "tiny",
                     dit: ZImageDiTConfig | None = None, wtype: str = "f16", fmt: str = "safetensors",
                     seed: int = 0, name: str | None = None, overwrite: bool = False) -> Path:
    """Write (or reuse) a ControlNet Union file for the Z-Image DiT of ``size`` ("tiny" | "full"),
    or of the sizes ``dit`` gives; GGUF files may be quantised (``wtype`` "q4_k", ...). Returns its path."""
    cfg = dit or family_config("z-image-turbo", size).dit
    if not isinstance(cfg, ZImageDiTConfig):  # pragma: no cover - the family's configuration
        raise TypeError("a Z-Image DiT configuration is needed")
    planned = plan_tensors(controlnet_layout(variant, cfg), wtype, fmt)
    metadata: dict[str, MetaValue] = {
        "general.architecture": "z_image_control", "general.type": "model",
        "general.name": f"synthetic Z-Image-Turbo Fun ControlNet Union {variant} ({size})",
        "sdcpp_py.synthetic.model": f"z-image-turbo-controlnet-{variant}", "sdcpp_py.synthetic.size": size,
        "sdcpp_py.synthetic.seed": seed, "sdcpp_py.synthetic.weight_type": wtype}
    path = Path(out_dir) / (name or controlnet_filename(variant, size=size, wtype=wtype, seed=seed, fmt=fmt))
    if path.exists() and not overwrite and path.stat().st_size == file_size(planned, metadata, fmt):
        return path
    write_file(path, planned, seed=seed, metadata=metadata, fmt=fmt)
    return path
