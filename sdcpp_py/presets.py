"""Presets for the target models and the code that fetches their real weights.

The defaults are the articles': Z-Image-Turbo is distilled (guidance baked in,
cfg 1, 3-9 steps, ~1 MP); FLUX.2 Klein 4B runs 4 steps at cfg 1. Both use the
same Qwen3-4B text encoder, so one downloaded file serves both.

Weights come from the Hugging Face hub through ``huggingface_hub`` (which keeps
its usual cache, honours ``HF_HUB_OFFLINE`` and ``HF_HOME``); nothing here runs
at import or in tests against the network.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidArgumentError, ModelNotFoundError
from .families import FLUX2_KLEIN, Z_IMAGE

logger = logging.getLogger("sdcpp_py")


@dataclass(frozen=True)
class HubFile:
    """A file on the hub: repository and a glob for the file name ({quant} filled in)."""

    repo_id: str
    pattern: str

    def resolve_pattern(self, quant: str) -> str:
        return self.pattern.format(quant=quant)


@dataclass(frozen=True)
class Preset:
    name: str
    family: str
    steps: int
    cfg_scale: float
    sampler: str
    width: int
    height: int
    hub: dict[str, HubFile]        # component -> where its weights live
    default_quant: str = "Q4_K"

    def generation_defaults(self) -> dict[str, object]:
        return {"steps": self.steps, "cfg_scale": self.cfg_scale, "sampler": self.sampler,
                "width": self.width, "height": self.height}


# One Qwen3-4B for both models (the articles share the file; sdcpp_py can share it in RAM).
QWEN3_4B = HubFile("unsloth/Qwen3-4B-Instruct-2507-GGUF", "Qwen3-4B-Instruct-2507-{quant}*.gguf")

Z_IMAGE_TURBO = Preset(
    name="z-image-turbo", family=Z_IMAGE, steps=8, cfg_scale=1.0, sampler="euler",
    width=1024, height=1024,
    hub={
        "diffusion_model": HubFile("leejet/Z-Image-Turbo-GGUF", "z_image_turbo-{quant}.gguf"),
        "llm": QWEN3_4B,
        "vae": HubFile("black-forest-labs/FLUX.1-schnell", "ae.safetensors"),
    },
)

FLUX2_KLEIN_4B = Preset(
    name="flux2-klein-4b", family=FLUX2_KLEIN, steps=4, cfg_scale=1.0, sampler="euler",
    width=1024, height=1024,
    hub={
        "diffusion_model": HubFile("leejet/FLUX.2-klein-4B-GGUF", "flux-2-klein-4b-{quant}.gguf"),
        "llm": QWEN3_4B,
        "vae": HubFile("black-forest-labs/FLUX.2-dev", "ae.safetensors"),
    },
)

PRESETS: dict[str, Preset] = {p.name: p for p in (Z_IMAGE_TURBO, FLUX2_KLEIN_4B)}
_ALIASES = {"z-image": "z-image-turbo", "zimage": "z-image-turbo", "klein": "flux2-klein-4b",
            "flux2-klein": "flux2-klein-4b", "flux.2-klein-4b": "flux2-klein-4b"}


def get_preset(name_or_preset: str | Preset) -> Preset:
    if isinstance(name_or_preset, Preset):
        return name_or_preset
    if not isinstance(name_or_preset, str):
        raise TypeError(f"preset must be a name or a Preset, not {type(name_or_preset).__name__}")
    key = _ALIASES.get(name_or_preset.lower(), name_or_preset.lower())
    if key not in PRESETS:
        raise InvalidArgumentError(f"unknown preset {name_or_preset!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[key]


def preset_for_family(family: str) -> Preset | None:
    for p in PRESETS.values():
        if p.family == family:
            return p
    return None


def download(preset: str | Preset, *, quant: str | None = None, llm_quant: str = "Q4_K_M",
             cache_dir: str | None = None, local_files_only: bool = False,
             token: str | None = None) -> dict[str, Path]:
    """Fetch (or find in the hub cache) the files of a preset; returns component -> path.

    ``quant`` picks the diffusion model's quantisation (e.g. "Q8_0", "Q4_K", "Q2_K"),
    ``llm_quant`` the text encoder's. With ``local_files_only`` (or HF_HUB_OFFLINE=1)
    only the local cache is used.
    """
    from huggingface_hub import snapshot_download  # imported here: only this needs it

    p = get_preset(preset)
    quants = {"diffusion_model": quant or p.default_quant, "llm": llm_quant, "vae": ""}
    paths: dict[str, Path] = {}
    for component, hub_file in p.hub.items():
        pattern = hub_file.resolve_pattern(quants[component])
        logger.info("resolving %s: %s / %s", component, hub_file.repo_id, pattern)
        try:
            folder = Path(snapshot_download(hub_file.repo_id, allow_patterns=[pattern], cache_dir=cache_dir,
                                            local_files_only=local_files_only, token=token))
        except Exception as e:  # the hub's own errors: offline, not cached, gated, ...
            if not type(e).__module__.startswith("huggingface_hub"):
                raise
            raise ModelNotFoundError(f"cannot get {pattern!r} from {hub_file.repo_id}: {e}") from e
        matches = sorted(f for f in folder.rglob("*") if f.is_file()
                         and fnmatch.fnmatch(f.name, pattern.rsplit("/", 1)[-1]))
        if not matches:
            raise ModelNotFoundError(f"no file matching {pattern!r} in {hub_file.repo_id} ({folder})")
        paths[component] = matches[0]
    return paths
