"""Bad input raises a Python exception; the process and the context survive."""

import numpy as np
import pytest

from sdcpp_py import (
    ClosedError,
    ContextSettings,
    CorruptModelError,
    IncompatibleModelError,
    InvalidArgumentError,
    ModelNotFoundError,
    Pipeline,
)


def test_missing_file(tiny, tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        Pipeline(diffusion_model=tmp_path / "nope.gguf", llm=tiny.llm, vae=tiny.vae)
    with pytest.raises(FileNotFoundError):
        Pipeline(diffusion_model=tiny.diffusion_model, llm=tiny.llm, vae=tmp_path / "nope.safetensors")


def test_truncated_and_garbage_files(tiny, tmp_path):
    data = tiny.diffusion_model.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptModelError, match="truncated|past the end"):
        Pipeline(diffusion_model=cut, llm=tiny.llm, vae=tiny.vae)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CorruptModelError):
        Pipeline(diffusion_model=tiny.diffusion_model, llm=tiny.llm, vae=junk)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(CorruptModelError):
        Pipeline(diffusion_model=empty, llm=tiny.llm, vae=tiny.vae)


def test_wrong_vae_for_the_family(tiny_sets):
    z, k = tiny_sets["z-image-turbo"], tiny_sets["flux2-klein"]
    with pytest.raises(IncompatibleModelError, match="wrong VAE.*16 latent channels"):
        Pipeline(diffusion_model=k.diffusion_model, llm=k.llm, vae=z.vae)
    with pytest.raises(IncompatibleModelError, match="wrong VAE.*32 latent channels"):
        Pipeline(diffusion_model=z.diffusion_model, llm=z.llm, vae=k.vae)


def test_missing_components(tiny):
    with pytest.raises(IncompatibleModelError, match="VAE"):
        Pipeline(diffusion_model=tiny.diffusion_model, llm=tiny.llm)
    with pytest.raises(IncompatibleModelError, match="text encoder"):
        Pipeline(diffusion_model=tiny.diffusion_model, vae=tiny.vae)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(width=100), InvalidArgumentError, "multiple of 16"),
    (dict(height=72), InvalidArgumentError, "multiple of 16"),
    (dict(width=0), InvalidArgumentError, "width"),
    (dict(width=65536, height=65536), InvalidArgumentError, "width"),
    (dict(width=4096, height=4096 + 16), InvalidArgumentError, "height"),
    (dict(steps=0), InvalidArgumentError, "steps"),
    (dict(steps=-3), InvalidArgumentError, "steps"),
    (dict(cfg_scale=float("nan")), InvalidArgumentError, "cfg_scale"),
    (dict(sampler="warp_drive"), InvalidArgumentError, "unknown sampler"),
    (dict(scheduler="weekly"), InvalidArgumentError, "unknown scheduler"),
    (dict(seed=-5), InvalidArgumentError, "seed"),
    (dict(seed=2**63), InvalidArgumentError, "seed"),
    (dict(batch_count=0), InvalidArgumentError, "batch_count"),
    (dict(width="64"), TypeError, "width"),
    (dict(steps=2.5), TypeError, "steps"),
    (dict(seed=True), TypeError, "seed"),
    (dict(sampler=3), TypeError, "sampler"),
])
def test_bad_generation_arguments(pipe, kw, exc, match):
    args = dict(width=64, height=64, steps=1, seed=1)
    args.update(kw)
    with pytest.raises(exc, match=match):
        pipe.generate("x", **args)
    assert pipe.generate("x", width=64, height=64, steps=1, seed=1).image.size == (64, 64)


def test_bad_prompt_type(pipe):
    with pytest.raises(TypeError, match="prompt"):
        pipe.generate(None, width=64, height=64, steps=1)
    with pytest.raises(TypeError, match="prompt"):
        pipe.generate(b"bytes", width=64, height=64, steps=1)


def test_bad_context_settings(tiny):
    with pytest.raises(InvalidArgumentError, match="weight type"):
        ContextSettings(wtype="q3_fancy")
    with pytest.raises(InvalidArgumentError, match="n_threads"):
        ContextSettings(n_threads=0)
    with pytest.raises(TypeError):
        Pipeline(diffusion_model=123, llm=tiny.llm, vae=tiny.vae)
    with pytest.raises(TypeError, match="not both"):
        Pipeline(diffusion_model=tiny.diffusion_model, settings=ContextSettings(), n_threads=1)


def test_close_is_idempotent_and_final(tiny):
    p = Pipeline(diffusion_model=tiny.diffusion_model, llm=tiny.llm, vae=tiny.vae, n_threads=1)
    assert p.generate("x", width=64, height=64, steps=1, seed=3).image.size == (64, 64)
    p.close()
    p.close()
    assert p.closed
    with pytest.raises(ClosedError):
        p.generate("x", width=64, height=64, steps=1)
    with Pipeline(diffusion_model=tiny.diffusion_model, llm=tiny.llm, vae=tiny.vae) as q:
        pass
    assert q.closed
