"""Inpainting: a mask with the init image, in generate(), the staged calls, the CLI (--mask), the
server (OpenAI's mask: transparent pixels are edited). Outside the mask the result keeps the init
image's latent exactly; in pixels it keeps it as well as the VAE decoder reconstructs it (the
decoder's mid-block attention spreads every latent cell over the image: on these random tiny VAEs,
not closely; on a trained VAE, to its reconstruction error)."""

from __future__ import annotations

import base64
import io
import subprocess

import numpy as np
import pytest
from PIL import Image

from sdcpp_py import InvalidArgumentError
from sdcpp_py._images import mask_from_alpha
from sdcpp_py.cli import main

KW = dict(width=64, height=64, steps=4, seed=5, strength=0.8)


@pytest.fixture(scope="module")
def init_and_mask():
    init = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255                                  # the right half regenerates
    return init, Image.fromarray(mask)


def test_outside_the_mask_the_init_latent_stays(pipe, init_and_mask):
    init, mask = init_and_mask
    latent = pipe.encode_image(init, seed=5)
    cond = pipe.encode("a red door")
    out = pipe.denoise(cond, init_latent=latent, mask=mask, steps=4, seed=5, strength=1.0).data
    f = 64 // latent.data.shape[-1]
    kept = np.asarray(mask)[::f, ::f] == 0
    diff = np.abs(out - latent.data)[0]
    assert diff[:, kept].max() < 1e-6 and diff[:, ~kept].mean() > 0.1
    # one-shot == staged, and the mask changes the image
    one_shot = pipe.generate("a red door", init_image=init, mask=mask, **KW).arrays[0]
    staged = next(pipe.images(pipe.settings_for("a red door", **KW), init_image=init, mask=mask)).image
    assert np.array_equal(one_shot, np.asarray(staged))
    assert not np.array_equal(one_shot, pipe.generate("a red door", init_image=init, **KW).arrays[0])


def test_bad_masks_raise_and_the_pipeline_stays_usable(pipe, init_and_mask):
    init, mask = init_and_mask
    cases = [(dict(init_image=init, mask=mask.resize((48, 48))), "the mask is 48x48"),
             (dict(init_image=init, mask=mask.convert("RGB")), "one-channel"),
             (dict(mask=mask), "needs an init image"),
             (dict(init_image=init, mask=np.zeros((64, 64), np.float32)), "2-D, uint8 or bool")]
    for kwargs, message in cases:
        with pytest.raises(InvalidArgumentError, match=message):
            pipe.generate("x", **kwargs, **KW)
    with pytest.raises(InvalidArgumentError, match="needs an init latent"):
        pipe.denoise(pipe.encode("x"), mask=mask, width=64, height=64, steps=1)
    bool_mask = np.asarray(mask) > 0
    assert np.array_equal(pipe.generate("x", init_image=init, mask=bool_mask, **KW).arrays[0],
                          pipe.generate("x", init_image=init, mask=mask, **KW).arrays[0])


def test_mask_equals_sd_cli(sd_cli, tiny_sets, pipelines, init_and_mask, tmp_path):
    init, mask = init_and_mask
    init.save(tmp_path / "init.png")
    mask.save(tmp_path / "mask.png")
    m = tiny_sets["z-image-turbo"]
    args = ["--diffusion-model", str(m.diffusion_model), "--llm", str(m.llm), "--vae", str(m.vae), "-p",
            "a red door", "-i", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"), "--strength", "0.8",
            "--steps", "4", "-s", "5", "-t", "2", "--cfg-scale", "1"]
    run = subprocess.run([str(sd_cli), *args, "-o", str(tmp_path / "cli.png")], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = np.asarray(Image.open(tmp_path / "cli.png").convert("RGB"))
    ours = pipelines["z-image-turbo"].generate("a red door", init_image=init, mask=mask, **KW).arrays[0]
    assert np.array_equal(ours, theirs)
    assert main([*args, "-o", str(tmp_path / "ours.png"), "--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "ours.png").convert("RGB")), theirs)


def test_server_takes_openais_mask(tiny_sets, pipelines, init_and_mask):
    testclient = pytest.importorskip("fastapi.testclient")
    from sdcpp_py.server import Limits, Registry, ServerConfig, create_app, model_set

    init, mask = init_and_mask
    rgba = init.convert("RGBA")
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[:, 32:] = 0                                   # transparent: edit
    rgba.putalpha(Image.fromarray(alpha))
    assert np.array_equal(np.asarray(mask_from_alpha(rgba)), np.asarray(mask))

    def png(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    m = tiny_sets["z-image-turbo"]
    entry = model_set("z", {"diffusion_model": str(m.diffusion_model), "llm": str(m.llm), "vae": str(m.vae),
                            "settings": {"n_threads": 2}})
    registry = Registry([entry])
    try:
        with testclient.TestClient(create_app(registry, ServerConfig((entry,), Limits()))) as c:
            data = {"prompt": "a red door", "size": "64x64", "steps": "4", "seed": "5", "strength": "0.8"}
            r = c.post("/v1/images/edits", data=data,
                       files={"image": ("i.png", png(init), "image/png"), "mask": ("m.png", png(rgba), "image/png")})
            assert r.status_code == 200, r.text
            got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).convert("RGB"))
            assert np.array_equal(got, pipelines["z-image-turbo"].generate("a red door", init_image=init, mask=mask,
                                                                          **KW).arrays[0])
            small = rgba.resize((32, 32))
            r = c.post("/v1/images/edits", data=data,
                       files={"image": ("i.png", png(init), "image/png"), "mask": ("m.png", png(small), "image/png")})
            assert r.status_code == 400 and r.json()["error"]["param"] == "mask"
            r = c.post("/v1/images/edits", data=data, files={"image": ("i.png", png(init), "image/png"),
                                                             "mask": ("m.png", png(init), "image/png")})
            assert r.status_code == 400 and "alpha" in r.json()["error"]["message"]
    finally:
        registry.close()
