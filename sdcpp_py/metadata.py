"""Generation settings in a PNG, in sd-cli's ``parameters`` layout, and back.

sd-cli writes one ``parameters`` text chunk: the prompt, a negative-prompt line,
then ``Steps: 4, CFG scale: 1.000000, ... Version: stable-diffusion.cpp, SDCPP:
{json}`` with the JSON schema ``sdcpp.image.params/v1``. We write the same lines
and the same JSON, with one more key, ``sdcpp_py``: everything a rerun needs that
sd-cli's JSON does not hold (the settings as given to us, the pixel-relevant
context settings, the files' hash prefixes, the weight policy's plan).
:func:`read_parameters` reads both ours and sd-cli's images.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from ._version import ENGINE_COMMIT, ENGINE_VERSION, __version__
from .errors import InvalidArgumentError
from .fileid import file_hash, write_whole
from .settings import GenerationSettings, parse_request, request

logger = logging.getLogger("sdcpp_py")
SCHEMA = "sdcpp.image.params/v1"
KEY = "parameters"
# Context settings that change pixels (a rerun must use the same ones).
PIXEL_CONTEXT = ("rng", "sampler_rng", "wtype", "upcast", "upcast_type", "repack", "tensor_type_rules", "vae_weights",
                 "flash_attn", "diffusion_flash_attn", "bf16_attention", "vae_conv_direct", "diffusion_conv_direct",
                 "circular_x", "circular_y")
_PLAN_KEYS = ("components", "target", "reason", "per_component", "cpu_variant")


def _f(x: float) -> str:
    return f"{x:.6f}"     # C++ std::to_string(float)


@dataclass
class ImageParameters:
    """What made one image: its settings (``seed`` is this image's), files and context."""

    settings: GenerationSettings
    models: dict[str, str] = field(default_factory=dict)     # role -> file name
    hashes: dict[str, str] = field(default_factory=dict)     # role -> sha256 prefix
    context: dict[str, Any] = field(default_factory=dict)    # PIXEL_CONTEXT values
    weights: dict[str, Any] = field(default_factory=dict)    # the weight policy's plan
    source: str = "sdcpp_py"                                 # "sdcpp_py" or "sd-cli"

    def to_text(self) -> str:
        s = self.settings
        lines = [s.prompt]
        if s.negative_prompt:
            lines.append(f"Negative prompt: {s.negative_prompt}")
        rng = self.context.get("rng") or "cuda"
        items = [f"Steps: {s.steps}", f"CFG scale: {_f(s.cfg_scale)}",
                 f"Guidance: {_f(s.guidance if s.guidance is not None else 3.5)}", f"Seed: {s.seed}",
                 f"Size: {s.width}x{s.height}", f"Model: {self.models.get('model', '')}", f"RNG: {rng}"]
        if self.context.get("sampler_rng"):
            items.append(f"Sampler RNG: {self.context['sampler_rng']}")
        sampler = f"Sampler: {s.sampler or 'default'}"
        if s.sigmas is not None:
            sampler += ", Custom Sigmas: [" + ", ".join(f"{v:.4f}" for v in s.sigmas) + "]"
        elif s.scheduler:
            sampler += f" {s.scheduler}"
        items.append(sampler)
        if "llm" in self.models:
            items.append(f"TE: {self.models['llm']}")
        if "diffusion_model" in self.models:
            items.append(f"Unet: {self.models['diffusion_model']}")
        if "vae" in self.models:
            items.append(f"VAE: {self.models['vae']}")
        if "controlnet" in self.models:
            items.append(f"ControlNet: {self.models['controlnet']}, Control strength: {_f(s.control_strength)}")
        items += [f"{role} hash: {h}" for role, h in self.hashes.items()]
        items.append("Version: stable-diffusion.cpp")
        lines.append(", ".join(items) + ", SDCPP: " + json.dumps(self.to_json(), separators=(",", ":")))
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        s = self.settings
        sampling: dict[str, Any] = {"steps": s.steps, "flow_shift": s.flow_shift,
                                    "guidance": {"txt_cfg": s.cfg_scale, "distilled_guidance": s.guidance}}
        if s.sampler:
            sampling["method"] = s.sampler
        if s.scheduler:
            sampling["scheduler"] = s.scheduler
        if s.sigmas is not None:
            sampling["custom_sigmas"] = list(s.sigmas)
        root: dict[str, Any] = {
            "schema": SCHEMA, "mode": "img_gen",
            "generator": {"name": "stable-diffusion.cpp", "version": ENGINE_VERSION, "commit": ENGINE_COMMIT},
            "seed": s.seed, "width": s.width, "height": s.height,
            "prompt": {"positive": s.prompt, "negative": s.negative_prompt},
            "sampling": sampling, "models": dict(self.models), "strength": s.strength,
            "rng": self.context.get("rng") or "cuda",
        }
        if self.context.get("sampler_rng"):
            root["sampler_rng"] = self.context["sampler_rng"]
        if s.vae_tiling:
            root["vae_tiling"] = {"enabled": True}
        root["sdcpp_py"] = {"version": __version__, "settings": {**s.to_dict(), "batch_count": 1},
                            "context": self.context, "hashes": self.hashes, "weights": self.weights}
        return root

    @classmethod
    def from_text(cls, text: str) -> ImageParameters:
        """Parse a ``parameters`` text (ours or sd-cli's)."""
        marker, root, start = ", SDCPP: ", None, 0
        while (i := text.find(marker, start)) >= 0:      # the prompt itself may hold the marker
            try:
                root = json.loads(text[i + len(marker):])
                break
            except json.JSONDecodeError:
                start = i + 1
        if root is None:
            raise InvalidArgumentError("the parameters hold no readable SDCPP JSON (not written by sd-cli or sdcpp-py)")
        if not isinstance(root, dict) or root.get("schema") != SCHEMA:
            raise InvalidArgumentError(f"the parameters' JSON is not {SCHEMA}")
        try:
            return cls._from_root(root)
        except (TypeError, KeyError, ValueError) as e:
            raise InvalidArgumentError(f"the parameters' SDCPP JSON does not describe an image: {e}") from None

    @classmethod
    def _from_root(cls, root: dict[str, Any]) -> ImageParameters:
        ours = root.get("sdcpp_py")
        if isinstance(ours, dict) and isinstance(ours.get("settings"), dict):
            settings = request(**parse_request(ours["settings"], where="the image's sdcpp_py settings"))
            return cls(settings, dict(root.get("models") or {}), dict(ours.get("hashes") or {}),
                       dict(ours.get("context") or {}), dict(ours.get("weights") or {}), "sdcpp_py")
        return cls._from_sd_cli(root)

    @classmethod
    def _from_sd_cli(cls, root: dict[str, Any]) -> ImageParameters:
        sampling = root.get("sampling") or {}
        guidance = sampling.get("guidance") or {}
        sigmas = sampling.get("custom_sigmas") or None
        prompt = root.get("prompt") or {}
        flow_shift = sampling.get("flow_shift")
        settings = request(
            prompt=prompt.get("positive", ""), negative_prompt=prompt.get("negative", ""),
            width=int(root["width"]), height=int(root["height"]), steps=int(sampling.get("steps", 20)),
            cfg_scale=float(guidance.get("txt_cfg", 7.0)), sampler=sampling.get("method"),
            scheduler=sampling.get("scheduler"), seed=int(root.get("seed", 42)),
            flow_shift=float(flow_shift) if flow_shift is not None and 0 < float(flow_shift) < 1e30 else None,
            guidance=float(guidance["distilled_guidance"]) if "distilled_guidance" in guidance else None,
            sigmas=tuple(sigmas) if sigmas else None, strength=float(root.get("strength", 0.75)),
            vae_tiling=bool((root.get("vae_tiling") or {}).get("enabled", False)))
        context = {"rng": root.get("rng", "cuda"), "sampler_rng": root.get("sampler_rng")}
        return cls(settings, dict(root.get("models") or {}), {}, context, {}, "sd-cli")


def read_parameters(path: str | Path) -> ImageParameters:
    """The settings stored in a PNG written by sdcpp-py or sd-cli."""
    p = Path(path)
    if not p.is_file():
        raise InvalidArgumentError(f"{p}: no such image")
    try:
        with Image.open(p) as im:
            text = im.info.get(KEY)
    except OSError as e:
        raise InvalidArgumentError(f"{p}: not an image ({e})") from None
    if not isinstance(text, str):
        raise InvalidArgumentError(f"{p} carries no '{KEY}' text")
    try:                   # sd-cli writes UTF-8 into a tEXt chunk, which PIL decodes as Latin-1
        text = text.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        pass               # an iTXt chunk (ours): already decoded
    return ImageParameters.from_text(text)


def _pnginfo(parameters: ImageParameters | None) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_itxt(KEY, parameters.to_text())
    return info


def save_png(image: Image.Image, path: str | Path, parameters: ImageParameters | None) -> Path:
    """Write ``image`` as PNG with a ``parameters`` text chunk (none when ``parameters`` is None),
    whole (by rename: an interrupted write leaves no partial file)."""
    p = Path(path)
    write_whole(p, png_bytes(image, parameters))
    return p


def image_bytes(image: Image.Image, suffix: str, parameters: ImageParameters | None = None) -> bytes:
    """The file of ``image`` in the format its suffix names (PNG: with ``parameters``)."""
    if suffix.lower() == ".png":
        return png_bytes(image, parameters)
    buf = io.BytesIO()
    image.save(buf, format=Image.registered_extensions().get(suffix.lower(), "PNG"))
    return buf.getvalue()


def png_bytes(image: Image.Image, parameters: ImageParameters | None) -> bytes:
    """The PNG file :func:`save_png` writes, as bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=_pnginfo(parameters))
    return buf.getvalue()


def image_parameters(pipe: Any, settings: GenerationSettings, seed: int, weights: dict[str, Any] | None = None,
                     *, hashes: bool = True, control: bool = False) -> ImageParameters:
    """The parameters of one image a Pipeline made with ``settings`` and ``seed`` (``control``: and
    its ControlNet, whose file joins the models)."""
    paths: dict[str, Path | None] = dict(pipe.paths)
    if control and getattr(pipe, "controlnet", None) is not None:
        paths["controlnet"] = pipe.controlnet.path
    models = {role: p.name for role, p in paths.items() if p is not None}
    digests = {role: file_hash(p) for role, p in paths.items() if p is not None} if hashes else {}
    if hashes:
        digests.update({f"lora {Path(p).name}": file_hash(Path(p)) for p, _ in settings.loras})
    context = {k: getattr(pipe.settings, k) for k in PIXEL_CONTEXT}
    one = settings.one(seed)
    plan = {k: v for k, v in (weights or {}).items() if k in _PLAN_KEYS}
    return ImageParameters(one, models, digests, context, plan)
