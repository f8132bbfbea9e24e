"""The values a Pipeline hands back, owned by Python: results, and what staged calls pass
between them.

A :class:`Conditioning` is a text encoding (numpy arrays, the family and the
encoder that made it); a :class:`Latent` is a denoised (or VAE-encoded) latent.
Both cross the FFI as ``sdcpp_tensor_t`` views (``_marshal``): the library copies
what it is given and Python copies what it gets back, so no pointer outlives a call.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import SdcppError
from .fileid import write_whole
from .settings import GenerationSettings

PartKey = tuple[int, str, int]  # (role: 0 positive / 1 negative, part name, index)
POSITIVE, NEGATIVE = 0, 1
_FORMAT = "sdcpp_py.conditioning/1"


@dataclass(frozen=True, eq=False)
class Conditioning:
    """A prompt's encoding, reusable across seeds, sizes, steps and samplers."""

    parts: dict[PartKey, np.ndarray]
    family: str
    encoder: str                       # identity of the text encoder that made it
    prompt: str
    negative_prompt: str | None = None
    seconds: float = 0.0               # time the encoding took

    @property
    def has_negative(self) -> bool:
        return any(role == NEGATIVE for role, _, _ in self.parts)

    @property
    def context(self) -> np.ndarray:
        """The positive cross-attention context, shape (tokens, width)."""
        return self.parts[(POSITIVE, "c_crossattn", 0)]

    def save(self, path: str | Path) -> Path:
        """Write to ``.npz`` (arrays plus a JSON header); ``Conditioning.load`` reads it back."""
        p = Path(path)
        meta = {"format": _FORMAT, "family": self.family, "encoder": self.encoder, "prompt": self.prompt,
                "negative_prompt": self.negative_prompt, "parts": [list(k) for k in self.parts]}
        arrays = {f"part{i}": a for i, a in enumerate(self.parts.values())}
        arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stubs take ** for allow_pickle
        write_whole(p, buf.getvalue())
        return p

    @classmethod
    def load(cls, path: str | Path) -> Conditioning:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"no such file: {p}")
        try:
            with np.load(p, allow_pickle=False) as z:
                meta = json.loads(bytes(z["__meta__"]).decode())
                if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
                    raise SdcppError(f"{p}: unknown conditioning format "
                                     f"{meta.get('format') if isinstance(meta, dict) else None!r}")
                parts = {(int(k[0]), str(k[1]), int(k[2])): z[f"part{i}"] for i, k in enumerate(meta["parts"])}
                return cls(parts, str(meta["family"]), str(meta["encoder"]), str(meta["prompt"]),
                           meta["negative_prompt"])
        except SdcppError:
            raise
        except (OSError, ValueError, KeyError, TypeError, IndexError, zipfile.BadZipFile) as e:
            raise SdcppError(f"{p}: not a saved Conditioning ({type(e).__name__}: {e})") from None


@dataclass(frozen=True, eq=False)
class Latent:
    """A latent in the diffusion model's space, shape (1, channels, height/f, width/f)."""

    data: np.ndarray
    family: str
    scale: int                          # pixels per latent cell (the VAE factor)
    seed: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return int(self.data.shape[-3])

    @property
    def width(self) -> int:
        return int(self.data.shape[-1]) * self.scale

    @property
    def height(self) -> int:
        return int(self.data.shape[-2]) * self.scale


@dataclass
class GenerationResult:
    """Images of one call, the request that made them and where the time went."""

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


@dataclass
class ImageItem:
    """One image of the staged loop (``Pipeline.images``, ``Pipeline.sweep``): its request (a
    batch of one, its own seed), its latent and where the time went."""

    image: Image.Image
    settings: GenerationSettings
    latent: Latent | None                 # None: a hires image (the engine's two passes in one call)
    timings: dict[str, float]

    @property
    def seed(self) -> int:
        return self.settings.seed


@dataclass
class SweepResult:
    items: list[ImageItem]
    conditioning: Conditioning
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def images(self) -> list[Image.Image]:
        return [i.image for i in self.items]
