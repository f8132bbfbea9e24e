"""A synthetic RealESRGAN x4plus (RRDBNet: 64 features, 32 growth channels, x4) in the original
layout (``conv_first``, ``body.N.rdbK.convJ``, ``conv_body``, ``conv_up1``/``conv_up2``,
``conv_hr``, ``conv_last``), random weights: 23 blocks at full size (67 MB F32), 1 when tiny."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .lora import write_safetensors

FEAT, GROW = 64, 32


def esrgan_tensors(blocks: int = 23, seed: int = 0, std: float = 0.02) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}

    def conv(name: str, c_in: int, c_out: int) -> None:
        out[f"{name}.weight"] = (rng.standard_normal((c_out, c_in, 3, 3)) * std).astype(np.float32)
        out[f"{name}.bias"] = np.zeros(c_out, np.float32)

    conv("conv_first", 3, FEAT)
    for b in range(blocks):
        for r in (1, 2, 3):
            for j in range(1, 6):
                conv(f"body.{b}.rdb{r}.conv{j}", FEAT + (j - 1) * GROW, GROW if j < 5 else FEAT)
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        conv(name, FEAT, FEAT)
    conv("conv_last", FEAT, 3)
    return out


def write_esrgan(path: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a RealESRGAN x4plus layout ("full": 23 blocks, "tiny": 1) as safetensors."""
    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', not {size!r}")
    return write_safetensors(path, esrgan_tensors(23 if size == "full" else 1, seed), {"arch": "RRDBNet x4"})
