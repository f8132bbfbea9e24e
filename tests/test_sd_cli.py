"""Our in-process image equals upstream sd-cli's, bit for bit, for the same inputs.

sd-cli is built from the same pinned source when the package is built with
SDCPP_PY_BUILD_CLI=ON (the README's test command does). SDCPP_PY_REQUIRE_CLI=1
(set by CI) turns its absence into a failure instead of a skip.
"""

import os
import subprocess

import numpy as np
import pytest
from PIL import Image


@pytest.mark.parametrize("sampler, steps, size", [("euler", 2, (64, 48)), ("dpm++2m", 3, (48, 64))])
def test_same_image_as_sd_cli(sd_cli, pipe, tiny, tmp_path, sampler, steps, size):
    prompt = "a watercolour of a harbour, boats, morning light"
    width, height = size
    seed = 1234
    out = tmp_path / "cli.png"
    cmd = [str(sd_cli), "--diffusion-model", str(tiny.diffusion_model), "--llm", str(tiny.llm),
           "--vae", str(tiny.vae), "-p", prompt, "-W", str(width), "-H", str(height),
           "--steps", str(steps), "--cfg-scale", "1", "--sampling-method", sampler,
           "-s", str(seed), "-t", str(pipe.settings.n_threads), "-o", str(out)]
    cmd += ["--fa"] if pipe.settings.flash_attn else []   # the same settings on both sides
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    theirs = np.asarray(Image.open(out).convert("RGB"))

    ours = pipe.generate(prompt, width=width, height=height, steps=steps, cfg_scale=1.0,
                         sampler=sampler, seed=seed).arrays[0]
    assert ours.shape == theirs.shape == (height, width, 3)
    assert ours.std() > 1.0
    assert np.array_equal(ours, theirs), f"max diff {np.abs(ours.astype(int) - theirs).max()}"


def test_repacked_weights_same_image_as_sd_cli(sd_cli, model_dir, tmp_path):
    """Q4_0 weights in ggml's repacked layout: sd-cli places them the same way when told
    (SD_CPU_WEIGHT_BUFFERS), and then the images are equal bit for bit."""
    from sdcpp_py import Pipeline
    from sdcpp_py.synthetic import write_model_set
    m = write_model_set("z-image-turbo", model_dir, size="tiny", seed=5, dit_type="q4_0", llm_type="q4_0")
    prompt, seed, out = "a lighthouse at dawn", 77, tmp_path / "cli.png"
    with Pipeline(diffusion_model=m.diffusion_model, llm=m.llm, vae=m.vae, n_threads=2, upcast="none") as pipe:
        result = pipe.generate(prompt, width=64, height=64, steps=2, seed=seed)
    assert result.weights["buffers"]["diffusion"].get("CPU_REPACK", 0) > 0
    cmd = [str(sd_cli), "--diffusion-model", str(m.diffusion_model), "--llm", str(m.llm), "--vae", str(m.vae),
           "-p", prompt, "-W", "64", "-H", "64", "--steps", "2", "--cfg-scale", "1", "-s", str(seed),
           "-t", "2", "-o", str(out)]
    env = {**os.environ, "SD_CPU_WEIGHT_BUFFERS": "CPU_REPACK"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "matmul weights in extra CPU buffers" in run.stdout + run.stderr
    theirs = np.asarray(Image.open(out).convert("RGB"))
    assert np.array_equal(result.arrays[0], theirs), f"max diff {np.abs(result.arrays[0].astype(int) - theirs).max()}"
