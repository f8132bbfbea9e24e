"""Synthetic LoRA files in the layouts published for these models, random low-rank weights.

Layouts (safetensors, F16 or F32):

- ``"peft"``: diffusers/PEFT, ``diffusion_model.<module>.lora_A.weight`` (rank x in) and
  ``lora_B.weight`` (out x rank); for Z-Image the modules carry diffusers' names (attention
  ``to_q``/``to_k``/``to_v``/``to_out.0``, ``feed_forward.w1``/``w2``/``w3``: the engine fuses
  q/k/v), for FLUX.2 Klein the original's (``double_blocks.N.img_attn.qkv``, ...), as the LoRAs
  published for ComfyUI name them;
- ``"kohya"``: ``lora_unet_<module with underscores>.lora_down.weight`` / ``lora_up.weight``.

``alpha`` adds a ``.alpha`` scalar per module (scale alpha / rank); without it the scale is 1.
``encoder=True`` adds LoRAs on the text encoder's attention (``text_encoders.llm...``).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np

from .layouts import component_layout

LORA_LAYOUTS = ("peft", "kohya")
# the DiT's matrices a LoRA targets (engine names), per family
_TARGETS = {"z-image-turbo": re.compile(r"^layers\.\d+\.(attention\.(qkv|out)|feed_forward\.w[123])\.weight$"),
            "flux2-klein": re.compile(r"^(double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02])|"
                                      r"single_blocks\.\d+\.linear[12])\.weight$")}


def lora_modules(family: str, size: str = "tiny", *, encoder: bool = False) -> list[tuple[str, int, int]]:
    """(module name as published, in features, out features) of every module the LoRA targets."""
    out: list[tuple[str, int, int]] = []
    for spec in component_layout(family, "dit", size):
        if not _TARGETS[family].match(spec.name):
            continue
        rows, cols = spec.shape
        module = spec.name.removesuffix(".weight")
        if family == "z-image-turbo" and module.endswith("attention.qkv"):
            base = module.removesuffix("qkv")
            out += [(f"diffusion_model.{base}to_{x}", cols, rows // 3) for x in "qkv"]
        elif family == "z-image-turbo" and module.endswith("attention.out"):
            out.append((f"diffusion_model.{module.removesuffix('out')}to_out.0", cols, rows))
        else:
            out.append((f"diffusion_model.{module}", cols, rows))
    if encoder:
        for spec in component_layout(family, "llm", size, llm_names="hf"):
            m = re.match(r"^model\.layers\.(\d+)\.self_attn\.(q|v)_proj\.weight$", spec.name)
            if m:
                rows, cols = spec.shape
                out.append((f"text_encoders.llm.{spec.name.removesuffix('.weight')}", cols, rows))
    return out


def write_lora(path: str | Path, family: str, size: str = "tiny", *, rank: int = 4, alpha: float | None = None,
               layout: str = "peft", encoder: bool = False, seed: int = 0, std: float = 0.05,
               dtype: str = "f16") -> Path:
    """Write a LoRA for ``family``'s DiT (and, with ``encoder``, its text encoder) to ``path``."""
    if layout not in LORA_LAYOUTS:
        raise ValueError(f"layout must be one of {LORA_LAYOUTS}, not {layout!r}")
    rng = np.random.default_rng(seed)
    np_type = {"f16": np.float16, "f32": np.float32}[dtype]
    tensors: dict[str, np.ndarray] = {}
    for module, n_in, n_out in lora_modules(family, size, encoder=encoder):
        down = (rng.standard_normal((rank, n_in)) * std).astype(np_type)
        up = (rng.standard_normal((n_out, rank)) * std).astype(np_type)
        if layout == "peft":
            names = (f"{module}.lora_A.weight", f"{module}.lora_B.weight", f"{module}.alpha")
        else:
            stem = "lora_unet_" + module.removeprefix("diffusion_model.").replace(".", "_")
            names = (f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha")
        tensors[names[0]], tensors[names[1]] = down, up
        if alpha is not None:
            tensors[names[2]] = np.array(alpha, dtype=np.float32)
    return write_safetensors(path, tensors, {"family": family, "rank": str(rank), "layout": layout})


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> Path:
    """``tensors`` as a safetensors file (F16/F32, C order), written whole."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset, blobs = 0, []
    for name, array in tensors.items():
        data = np.ascontiguousarray(array).tobytes()
        kind = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32"}[array.dtype]
        header[name] = {"dtype": kind, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.partial")
    with tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for blob in blobs:
            f.write(blob)
    tmp.replace(p)
    return p
