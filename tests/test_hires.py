"""Hires fix: a second pass at a larger size, through the request (generate, the staged loop, the
CLI's --hires flags: the same pixels as sd-cli)."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from PIL import Image

from sdcpp_py import InvalidArgumentError, ModelNotFoundError
from sdcpp_py.cli import main

KW = dict(width=64, height=64, steps=2, seed=5)
HIRES = dict(hires=True, hires_scale=2.0, hires_steps=2, hires_denoising_strength=0.6)


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_doubles_the_size_and_staged_equals_one_shot(pipe, upscaler):
    r = pipe.generate("a lighthouse", hires_upscaler=upscaler, **HIRES, **KW)
    assert r.image.size == (128, 128) and r.settings.output_size == (128, 128)
    plain = pipe.generate("a lighthouse", width=128, height=128, steps=2, seed=5).arrays[0]
    assert not np.array_equal(r.arrays[0], plain)
    item = next(pipe.images(pipe.settings_for("a lighthouse", hires_upscaler=upscaler, **HIRES, **KW)))
    assert item.latent is None and np.array_equal(np.asarray(item.image), r.arrays[0])
    square = pipe.generate("a lighthouse", hires=True, hires_width=96, hires_steps=1, **KW)
    assert square.image.size == (96, 96)


def test_hires_equals_sd_cli(sd_cli, tiny_sets, pipelines, tmp_path):
    m = tiny_sets["z-image-turbo"]
    args = ["--diffusion-model", str(m.diffusion_model), "--llm", str(m.llm), "--vae", str(m.vae), "-p",
            "a lighthouse", "-W", "64", "-H", "64", "--steps", "2", "-s", "5", "-t", "2", "--cfg-scale", "1",
            "--hires", "--hires-scale", "2", "--hires-steps", "2", "--hires-denoising-strength", "0.6"]
    run = subprocess.run([str(sd_cli), *args, "-o", str(tmp_path / "cli.png")], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = np.asarray(Image.open(tmp_path / "cli.png").convert("RGB"))
    assert theirs.shape == (128, 128, 3)
    ours = pipelines["z-image-turbo"].generate("a lighthouse", **HIRES, **KW).arrays[0]
    assert np.array_equal(ours, theirs)
    assert main([*args, "-o", str(tmp_path / "ours.png"), "--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "ours.png").convert("RGB")), theirs)


def test_bad_hires_settings(pipe, tmp_path):
    for bad, message in (({"hires_scale": 0.0}, "hires_scale"), ({"hires_upscaler": "Bilinear"}, "hires upscaler"),
                         ({"hires_width": 100}, "multiple of 16"), ({"hires_scale": 8.0, "width": 1024}, "hires pass"),
                         ({"hires_denoising_strength": 0.0}, "strength")):
        with pytest.raises(InvalidArgumentError, match=message):
            pipe.generate("x", **{**KW, **HIRES, **bad})
    with pytest.raises(ModelNotFoundError):
        pipe.generate("x", hires_upscaler=str(tmp_path / "esrgan.pth"), **HIRES, **KW)
    assert main(["-p", "x", "--diffusion-model", "m.gguf", "--hires", "--hires-upscaler", "RealESRGAN_x4",
                 "--hires-upscalers-dir", str(tmp_path)]) == 2
    assert pipe.generate("x", **KW).image.size == (64, 64)
