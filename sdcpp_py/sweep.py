"""Many images from one prompt encoding: a settings' seeds (``iter_images``), and sweeps,
a grid of seeds x steps x sizes x cfg x samplers for one prompt."""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PIL import Image

from ._callbacks import Preview, ProgressFn
from ._engine_thread import CancelToken
from ._images import ImageLike
from .settings import GenerationSettings
from .staged import Conditioning, Latent

if TYPE_CHECKING:
    from .pipeline import Pipeline


@dataclass
class SweepItem:
    image: Image.Image
    latent: Latent
    settings: GenerationSettings
    timings: dict[str, float]


@dataclass
class SweepResult:
    items: list[SweepItem]
    conditioning: Conditioning
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def images(self) -> list[Image.Image]:
        return [i.image for i in self.items]


@dataclass
class ImageItem:
    """One image of :func:`iter_images`: its seed, its settings (batch of one) and timings."""

    image: Image.Image
    seed: int
    settings: GenerationSettings
    timings: dict[str, float]


def iter_images(pipe: Pipeline, s: GenerationSettings, *, seeds: Sequence[int] | None = None,
                init_image: ImageLike | None = None, ref_images: Sequence[ImageLike] = (),
                progress: ProgressFn | None = None, preview: Preview | None = None,
                cancel: CancelToken | None = None) -> Iterator[ImageItem]:
    """generate_image's steps as staged calls, one image at a time: encode once (cached), the
    init image once (seeded with the first seed), then denoise and decode per seed.

    With the default seeds (``s.seeds()``) the images are those of ``generate_with(s)``."""
    seeds = list(seeds) if seeds is not None else s.seeds()
    start = time.perf_counter()
    cond = pipe.encode(s.prompt, s.negative_prompt if s.cfg_scale != 1.0 else None, cancel=cancel)
    encode_s = time.perf_counter() - start
    init = None
    if init_image is not None:
        init = pipe.encode_image(init_image, seed=seeds[0], width=s.width, height=s.height, cancel=cancel)
    for i, seed in enumerate(seeds):
        latent = pipe.denoise(cond, width=s.width, height=s.height, steps=s.steps, cfg_scale=s.cfg_scale,
                              sampler=s.sampler, scheduler=s.scheduler, seed=seed, flow_shift=s.flow_shift,
                              guidance=s.guidance, sigmas=s.sigmas, init_latent=init,
                              strength=s.strength if init is not None else None, ref_images=ref_images,
                              progress=progress, preview=preview, cancel=cancel)
        t0 = time.perf_counter()
        image = pipe.decode(latent, vae_tiling=s.vae_tiling, cancel=cancel)
        timings = {"encode_s": encode_s if i == 0 else 0.0, "denoise_s": latent.info["denoise_s"],
                   "decode_s": time.perf_counter() - t0}
        yield ImageItem(image, seed, dataclasses.replace(s, seed=seed, batch_count=1), timings)


def _encode(pipe: Pipeline, prompt: str, cfg_scales: Sequence[float | None],
            negative_prompt: str) -> Conditioning:
    default_cfg = pipe.preset.cfg_scale if pipe.preset else 1.0
    need_negative = any((c if c is not None else default_cfg) != 1.0 for c in cfg_scales)
    return pipe.encode(prompt, negative_prompt if need_negative else None)


def iter_sweep(pipe: Pipeline, prompt: str, *, seeds: Sequence[int | None] = (None,),
               steps: Sequence[int | None] = (None,), sizes: Sequence[tuple[int, int] | None] = (None,),
               cfg_scales: Sequence[float | None] = (None,), samplers: Sequence[str | None] = (None,),
               schedulers: Sequence[str | None] = (None,), negative_prompt: str = "",
               conditioning: Conditioning | None = None, progress: ProgressFn | None = None) -> Iterator[SweepItem]:
    """Yield one item per grid point as soon as it is decoded. The prompt is encoded
    once (with its negative only if some cfg differs from 1), unless ``conditioning``
    is given."""
    cond = conditioning if conditioning is not None else _encode(pipe, prompt, cfg_scales, negative_prompt)
    for size, n, cfg, sampler, scheduler, seed in itertools.product(
            sizes, steps, cfg_scales, samplers, schedulers, seeds):
        width, height = size if size is not None else (None, None)
        latent = pipe.denoise(cond, width=width, height=height, steps=n, cfg_scale=cfg, sampler=sampler,
                              scheduler=scheduler, seed=seed, progress=progress)
        t0 = time.perf_counter()
        image = pipe.decode(latent)
        decode_s = time.perf_counter() - t0
        yield SweepItem(image, latent, latent.info["settings"],
                        {"denoise_s": latent.info["denoise_s"], "decode_s": decode_s})


def sweep(pipe: Pipeline, prompt: str, *, negative_prompt: str = "", **grid: Any) -> SweepResult:
    """Run :func:`iter_sweep` to the end; timings hold encode_s and wall_s."""
    start = time.perf_counter()
    cond = _encode(pipe, prompt, grid.get("cfg_scales", (None,)), negative_prompt)
    encode_s = time.perf_counter() - start
    items = list(iter_sweep(pipe, prompt, conditioning=cond, **grid))
    return SweepResult(items, cond, {"encode_s": encode_s, "wall_s": time.perf_counter() - start})
