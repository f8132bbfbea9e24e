"""ESRGAN upscaling: on its own (Upscaler, -M upscale: sd-cli's pixels) and after a generation
(--upscale-model); bad files and sizes refused."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from PIL import Image

from sdcpp_py import IncompatibleModelError, InvalidArgumentError, ModelNotFoundError, Upscaler
from sdcpp_py.cli import main
from sdcpp_py.synthetic import write_esrgan


@pytest.fixture(scope="module")
def esrgan(tmp_path_factory):
    return write_esrgan(tmp_path_factory.mktemp("esrgan") / "RealESRGAN_x4plus-tiny.safetensors", seed=2)


def _photo(size=(48, 32)):
    return Image.fromarray((np.random.default_rng(1).random((size[1], size[0], 3)) * 255).astype(np.uint8))


def test_upscaler_x4_and_repeats(esrgan):
    with Upscaler(esrgan, n_threads=2) as up:
        assert up.scale == 4
        once = up.upscale(_photo())
        assert once.size == (192, 128)
        assert np.asarray(once).std() > 0
        assert np.array_equal(np.asarray(up.upscale(_photo())), np.asarray(once))     # resident, repeatable
        assert up.upscale(_photo((16, 16)), repeats=2).size == (256, 256)
        with pytest.raises(InvalidArgumentError, match="per side"):
            up.upscale(_photo((4096, 64)))
        with pytest.raises(InvalidArgumentError, match="repeats"):
            up.upscale(_photo(), repeats=0)
    with pytest.raises(Exception, match="closed"):
        up.upscale(_photo())


def test_bad_upscaler_files(tiny_sets, tmp_path):
    with pytest.raises(ModelNotFoundError):
        Upscaler(tmp_path / "missing.safetensors")
    with pytest.raises(IncompatibleModelError, match="not an ESRGAN"):
        Upscaler(tiny_sets["z-image-turbo"].vae)
    with pytest.raises(InvalidArgumentError, match="tile_size"):
        Upscaler(write_esrgan(tmp_path / "e.safetensors"), tile_size=4)


def test_upscale_mode_equals_sd_cli(sd_cli, esrgan, tmp_path):
    _photo().save(tmp_path / "in.png")
    args = ["-M", "upscale", "--upscale-model", str(esrgan), "-i", str(tmp_path / "in.png"), "-t", "2"]
    run = subprocess.run([str(sd_cli), *args, "-o", str(tmp_path / "cli.png")], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = np.asarray(Image.open(tmp_path / "cli.png").convert("RGB"))
    assert main([*args, "-o", str(tmp_path / "ours.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "ours.png").convert("RGB")), theirs)
    with Upscaler(esrgan, n_threads=2) as up:
        assert np.array_equal(np.asarray(up.upscale(_photo())), theirs)


def test_generation_then_upscale(tiny_sets, pipelines, esrgan, tmp_path):
    m = tiny_sets["z-image-turbo"]
    assert main(["--diffusion-model", str(m.diffusion_model), "--llm", str(m.llm), "--vae", str(m.vae), "-p", "x",
                 "-W", "64", "-H", "64", "--steps", "1", "-s", "3", "-t", "2", "--upscale-model", str(esrgan),
                 "-o", str(tmp_path / "big.png"), "--no-progress"]) == 0
    big = Image.open(tmp_path / "big.png")
    assert big.size == (256, 256)
    small = pipelines["z-image-turbo"].generate("x", width=64, height=64, steps=1, seed=3).image
    with Upscaler(esrgan, n_threads=2) as up:
        assert np.array_equal(np.asarray(big.convert("RGB")), np.asarray(up.upscale(small)))
