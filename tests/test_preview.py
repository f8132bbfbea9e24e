"""Preview images during sampling (the engine's preview callback), in-process and isolated."""

from __future__ import annotations

import numpy as np
import pytest

from sdcpp_py import InvalidArgumentError, Pipeline, Preview


def test_preview_every_step_and_interval(pipe):
    seen: list[tuple[int, tuple[int, ...]]] = []
    result = pipe.generate("a fox", width=64, height=64, steps=4, seed=3,
                           preview=Preview(lambda step, im: seen.append((step, im.shape))))
    assert [s for s, _ in seen] == [1, 2, 3, 4]
    h, w, c = seen[0][1]
    assert c == 3 and 1 <= w <= 64 and 1 <= h <= 64
    plain = pipe.generate("a fox", width=64, height=64, steps=4, seed=3)
    assert np.array_equal(result.arrays[0], plain.arrays[0])          # previews change nothing
    every_other: list[int] = []
    cond = pipe.encode("a fox")
    pipe.denoise(cond, width=64, height=64, steps=4, seed=3,
                 preview=Preview(lambda step, im: every_other.append(step), interval=2))
    assert every_other == [2, 4]


def test_preview_vae_mode_is_a_decode(pipelines):
    pipe = pipelines["z-image-turbo"]
    images: list[np.ndarray] = []
    pipe.generate("a fox", width=64, height=64, steps=2, seed=1,
                  preview=Preview(lambda step, im: images.append(im), mode="vae"))
    assert len(images) == 2 and images[-1].shape == (64, 64, 3)


def test_preview_error_stops_the_call(pipe):
    def boom(step: int, image: np.ndarray) -> None:
        raise RuntimeError("preview failed")

    with pytest.raises(RuntimeError, match="preview failed"):
        pipe.generate("a fox", width=64, height=64, steps=3, seed=1, preview=Preview(boom))
    assert pipe.generate("a fox", width=64, height=64, steps=1, seed=1).image.size == (64, 64)


def test_preview_bad_arguments():
    with pytest.raises(InvalidArgumentError):
        Preview(print, mode="fancy")
    with pytest.raises(TypeError):
        Preview(print, interval=0)
    with pytest.raises(TypeError):
        Preview("not callable")  # type: ignore[arg-type]


def test_preview_through_an_isolated_worker(tiny_sets):
    m = tiny_sets["flux2-klein"]
    steps: list[int] = []
    with Pipeline(diffusion_model=m.diffusion_model, llm=m.llm, vae=m.vae, n_threads=2, isolate=True) as pipe:
        pipe.generate("a fox", width=64, height=64, steps=3, seed=2,
                      preview=Preview(lambda step, im: steps.append(step)))
    assert steps == [1, 2, 3]
