"""Z-Image ControlNet Union through every face: on-demand loading and release, strength 0 == no
ControlNet, staged == one-shot, a control latent reused across seeds, inpainting's control
channels, GGUF files, bad input (the process lives on), the CLI (== sd-cli), the server."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdcpp_py import Pipeline
from sdcpp_py.controlnet import canny
from sdcpp_py.errors import IncompatibleModelError, InvalidArgumentError
from sdcpp_py.metadata import read_parameters
from sdcpp_py.staged import Latent
from sdcpp_py.synthetic import write_controlnet, write_model_set
from sdcpp_py.synthetic.layouts import ZImageDiTConfig

PROMPT = "a stone bridge over a river"
SIZE = 64


def _edges(seed: int = 0, size: int = SIZE) -> Image.Image:
    """A control image: white strokes on black, as an edge map looks."""
    rng = np.random.default_rng(seed)
    a = np.zeros((size, size, 3), np.uint8)
    for _ in range(6):
        y, x = rng.integers(0, size, 2)
        a[y, :] = 255
        a[:, x] = 255
    return Image.fromarray(a)


def _a(im: Image.Image) -> np.ndarray:
    return np.asarray(im).astype(np.int16)


@pytest.fixture(scope="module")
def files(model_dir):
    tiny = write_model_set("z-image-turbo", model_dir, size="tiny", seed=1)
    nets = {v: write_controlnet(model_dir, v, seed=2) for v in ("1.0", "2.0", "2.1")}
    return tiny, nets


@pytest.fixture(scope="module")
def cpipe(files):
    tiny, nets = files
    with Pipeline(diffusion_model=tiny.diffusion_model, llm=tiny.llm, vae=tiny.vae, controlnet=nets["2.1"],
                  n_threads=2) as p:
        yield p


def test_loaded_on_demand_released_and_reloaded(cpipe):
    cpipe.release_controlnet()
    assert cpipe.controlnet_loaded == {}
    plain = cpipe.generate(PROMPT, width=SIZE, height=SIZE, steps=2, seed=3).image
    assert cpipe.controlnet_loaded == {}                      # no control image: not loaded
    with_control = cpipe.generate(PROMPT, control_image=_edges(), steps=2, seed=3, control_strength=1.0).image
    info = cpipe.controlnet_loaded
    assert info["variant"] == "2.1" and info["channels"] == "33" and int(info["bytes"]) > 0
    assert np.abs(_a(with_control) - _a(plain)).mean() > 1.0
    cpipe.release_controlnet()
    assert cpipe.controlnet_loaded == {}
    again = cpipe.generate(PROMPT, control_image=_edges(), steps=2, seed=3, control_strength=1.0).image
    assert np.array_equal(_a(again), _a(with_control))       # read again from its file: same pixels


def test_strength_zero_is_the_plain_dit_bit_for_bit(cpipe):
    plain = cpipe.generate(PROMPT, width=SIZE, height=SIZE, steps=2, seed=5).image
    zero = cpipe.generate(PROMPT, control_image=_edges(), steps=2, seed=5, control_strength=0.0).image
    assert np.array_equal(_a(plain), _a(zero))
    half = cpipe.generate(PROMPT, control_image=_edges(), steps=2, seed=5, control_strength=0.5).image
    full = cpipe.generate(PROMPT, control_image=_edges(), steps=2, seed=5, control_strength=1.0).image
    assert 0 < np.abs(_a(half) - _a(plain)).mean() < np.abs(_a(full) - _a(plain)).mean() + 1e-9 + 50


@pytest.mark.parametrize("variant", ["1.0", "2.0", "2.1"])
def test_staged_equals_one_shot(files, variant):
    tiny, nets = files
    with Pipeline(diffusion_model=tiny.diffusion_model, llm=tiny.llm, vae=tiny.vae, controlnet=nets[variant],
                  n_threads=2) as p:
        one_shot = p.generate(PROMPT, control_image=_edges(1), steps=2, seed=9, control_strength=0.8, batch_count=2)
        s = p.settings_for(PROMPT, width=SIZE, height=SIZE, steps=2, seed=9, control_strength=0.8, batch_count=2)
        staged = [item.image for item in p.images(s, control_image=_edges(1))]
        # the control latent made once, reused for both seeds
        control = p.encode_control(_edges(1), seed=9)
        assert control.channels == 16 and control.info["control"]
        cond = p.encode(PROMPT)
        by_hand = [p.decode(p.denoise(cond, control=control, width=SIZE, height=SIZE, steps=2, seed=seed,
                                      control_strength=0.8)) for seed in (9, 10)]
        assert p.controlnet_loaded["variant"] == variant
    for a, b, c in zip(one_shot.images, staged, by_hand, strict=True):
        assert np.array_equal(_a(a), _a(b)) and np.array_equal(_a(a), _a(c))
    assert not np.array_equal(_a(one_shot.images[0]), _a(one_shot.images[1]))


def test_inpainting_control_channels(cpipe):
    init = Image.fromarray((np.random.default_rng(4).random((SIZE, SIZE, 3)) * 255).astype(np.uint8))
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, SIZE // 2:] = 255                                  # regenerate the right half
    control = cpipe.encode_control(_edges(), mask=Image.fromarray(mask), init_image=init)
    assert control.channels == 33
    kept = control.data[0, 16]
    assert (kept[:, : SIZE // 16] == 1).all() and (kept[:, SIZE // 16:] == 0).all()   # 1 - mask, latent cells
    plain_latent = cpipe.encode_control(_edges()).data
    assert np.array_equal(control.data[:, :16], plain_latent)
    result = cpipe.generate(PROMPT, init_image=init, mask=Image.fromarray(mask), control_image=_edges(), steps=2,
                            seed=2, strength=1.0, control_strength=1.0)
    s = result.settings
    staged = next(cpipe.images(s, init_image=init, mask=Image.fromarray(mask), control_image=_edges()))
    assert np.array_equal(_a(result.image), _a(staged.image))
    without = cpipe.generate(PROMPT, init_image=init, mask=Image.fromarray(mask), steps=2, seed=2, strength=1.0)
    assert not np.array_equal(_a(result.image), _a(without.image))


def test_gguf_quantized_controlnet_runs_repacked(files, tmp_path):
    tiny, _ = files
    q = write_controlnet(tmp_path, "1.0", fmt="gguf", wtype="q4_0", seed=2)
    with Pipeline(diffusion_model=tiny.diffusion_model, llm=tiny.llm, vae=tiny.vae, controlnet=q, n_threads=2) as p:
        plain = p.generate(PROMPT, width=SIZE, height=SIZE, steps=2, seed=1).image
        guided = p.generate(PROMPT, control_image=_edges(), steps=2, seed=1, control_strength=1.0).image
        info = p.controlnet_loaded
    assert info["variant"] == "1.0" and info["channels"] == "16"
    assert "CPU_REPACK:" in info["buffers"]             # its matmul weights in the repacked layout, as the DiT's
    assert np.abs(_a(guided) - _a(plain)).mean() > 1.0


def test_bad_input_raises_and_the_pipeline_lives_on(files, cpipe, tiny_sets, tmp_path):
    tiny, nets = files
    klein = tiny_sets["flux2-klein"]
    with pytest.raises(IncompatibleModelError, match="not a ControlNet Union"):
        Pipeline(diffusion_model=tiny.diffusion_model, llm=tiny.llm, vae=tiny.vae, controlnet=klein.diffusion_model)
    with pytest.raises(IncompatibleModelError, match="Z-Image DiT"):
        Pipeline(diffusion_model=klein.diffusion_model, llm=klein.llm, vae=klein.vae, controlnet=nets["2.1"])
    wide = write_controlnet(tmp_path, "2.1", dit=ZImageDiTConfig(hidden=384, layers=1, refiner_layers=1,
                                                                  cap_feat_dim=64), name="wide.safetensors")
    with pytest.raises(IncompatibleModelError, match="width 384"):
        cpipe.load_controlnet(wide)
    three = write_controlnet(tmp_path, "2.1", dit=ZImageDiTConfig(hidden=256, layers=3, refiner_layers=1,
                                                                   cap_feat_dim=64), name="three.safetensors")
    with pytest.raises(IncompatibleModelError, match="do not divide"):
        cpipe.load_controlnet(three)
    cpipe.load_controlnet(nets["2.1"])
    for strength in (-0.1, 2.5, float("nan"), "1"):
        with pytest.raises((InvalidArgumentError, TypeError)):
            cpipe.generate(PROMPT, control_image=_edges(), steps=1, control_strength=strength)
    with pytest.raises(InvalidArgumentError, match="the request 64x64"):
        cpipe.generate(PROMPT, control_image=_edges(size=48), width=SIZE, height=SIZE, steps=1)
    with pytest.raises(InvalidArgumentError, match="mode F"):
        cpipe.generate(PROMPT, control_image=Image.new("F", (SIZE, SIZE)), steps=1)
    with pytest.raises(InvalidArgumentError, match="uint8"):
        cpipe.generate(PROMPT, control_image=np.zeros((SIZE, SIZE, 3), np.float32), steps=1)
    cond = cpipe.encode(PROMPT)
    bad = [Latent(np.zeros((1, 34, 8, 8), np.float32), "z-image-turbo", 8),   # too many channels
           Latent(np.zeros((1, 16, 6, 8), np.float32), "z-image-turbo", 8),   # another size
           Latent(np.full((1, 16, 8, 8), np.nan, np.float32), "z-image-turbo", 8)]
    for control in bad:
        with pytest.raises(InvalidArgumentError):
            cpipe.denoise(cond, control=control, width=SIZE, height=SIZE, steps=1)
    with pytest.raises(TypeError):
        cpipe.denoise(cond, control=np.zeros((1, 16, 8, 8), np.float32), width=SIZE, height=SIZE, steps=1)
    with Pipeline(diffusion_model=tiny.diffusion_model, llm=tiny.llm, vae=tiny.vae, n_threads=2) as none:
        with pytest.raises(InvalidArgumentError, match="needs a ControlNet"):
            none.generate(PROMPT, control_image=_edges(), steps=1)
    # still usable
    assert cpipe.generate(PROMPT, control_image=_edges(), steps=1, seed=1).image.size == (SIZE, SIZE)


def test_isolated_engine_runs_the_controlnet(files):
    tiny, nets = files
    kwargs = {"diffusion_model": tiny.diffusion_model, "llm": tiny.llm, "vae": tiny.vae, "controlnet": nets["1.0"],
              "n_threads": 2}
    with Pipeline(**kwargs) as p:
        here = p.generate(PROMPT, control_image=_edges(), steps=2, seed=6, control_strength=1.0).image
    with Pipeline(**kwargs, isolate=True) as p:
        there = p.generate(PROMPT, control_image=_edges(), steps=2, seed=6, control_strength=1.0).image
        assert p.controlnet_loaded["variant"] == "1.0"
        with pytest.raises(InvalidArgumentError, match="hires"):
            p.generate(PROMPT, control_image=_edges(), steps=1, hires=True)
    assert np.array_equal(_a(here), _a(there))


def test_cancel_stops_a_controlnet_generation(cpipe):
    import threading
    import time

    from sdcpp_py.errors import Cancelled
    stop = threading.Event()
    timer = threading.Timer(0.5, stop.set)
    timer.start()
    t0 = time.perf_counter()
    with pytest.raises(Cancelled):
        cpipe.generate(PROMPT, control_image=_edges(size=256), steps=40, seed=1, control_strength=1.0, cancel=stop)
    assert time.perf_counter() - t0 < 5.0
    assert cpipe.generate(PROMPT, control_image=_edges(), steps=1, seed=1).image.size == (SIZE, SIZE)


def test_canny_finds_edges():
    a = np.zeros((SIZE, SIZE, 3), np.uint8)
    a[:, SIZE // 2:] = 255
    edges = np.asarray(canny(Image.fromarray(a)))
    assert edges.shape == (SIZE, SIZE, 3)
    column = edges[SIZE // 4: 3 * SIZE // 4, :, 0].max(axis=0)
    assert column[SIZE // 2 - 2: SIZE // 2 + 2].max() == 255 and column[: SIZE // 4].max() == 0


def _cli(*args: str, cwd) -> subprocess.CompletedProcess[str]:
    """Our CLI in a child, run from ``cwd`` (never the source tree: the installed package is tested)."""
    return subprocess.run([sys.executable, "-m", "sdcpp_py", *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_cli_control_net_equals_sd_cli(files, sd_cli, tmp_path):
    tiny, nets = files
    control = tmp_path / "control.png"
    Image.fromarray((np.random.default_rng(8).random((SIZE, SIZE, 3)) * 255).astype(np.uint8)).save(control)
    common = ["--diffusion-model", str(tiny.diffusion_model), "--llm", str(tiny.llm), "--vae", str(tiny.vae),
              "--control-net", str(nets["2.0"]), "--control-image", str(control), "--control-strength", "0.7",
              "--canny", "-p", PROMPT, "-W", str(SIZE), "-H", str(SIZE), "--steps", "2", "-s", "21", "-t", "2",
              "--cfg-scale", "1"]
    ours, theirs = tmp_path / "ours.png", tmp_path / "theirs.png"
    run = _cli(*common, "--upcast", "none", "--repack", "none", "-o", str(ours), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    ref = subprocess.run([str(sd_cli), *common, "-o", str(theirs)], capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-2000:]
    a, b = _a(Image.open(ours).convert("RGB")), _a(Image.open(theirs).convert("RGB"))
    assert np.array_equal(a, b), f"max diff {np.abs(a - b).max()}"
    params = read_parameters(ours)
    assert params.models["controlnet"] == nets["2.0"].name and params.settings.control_strength == 0.7
    again = _cli("--diffusion-model", str(tiny.diffusion_model), "--llm", str(tiny.llm), "--vae", str(tiny.vae),
                 "--from-png", str(ours), "-o", str(tmp_path / "again.png"), cwd=tmp_path)
    assert again.returncode == 2 and "--control-image" in again.stderr       # not silently without it
    refused = _cli(*common[:-2], "--control-net-cpu", "-o", str(tmp_path / "x.png"), cwd=tmp_path)
    assert refused.returncode == 2 and "--control-net-cpu" in refused.stderr
    lonely = _cli("--diffusion-model", str(tiny.diffusion_model), "--llm", str(tiny.llm), "--vae", str(tiny.vae),
                  "--control-image", str(control), "-p", "x", "-o", str(tmp_path / "y.png"), cwd=tmp_path)
    assert lonely.returncode == 2 and "--control-net" in lonely.stderr


def test_server_control_image_upload(files):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from sdcpp_py.server import Limits, ModelSet, Registry, ServerConfig, create_app
    tiny, nets = files
    base = {"diffusion_model": str(tiny.diffusion_model), "llm": str(tiny.llm), "vae": str(tiny.vae)}
    entries = [ModelSet("zc", {**base, "controlnet": str(nets["2.1"])}, settings={"n_threads": 2}),
               ModelSet("z", base, settings={"n_threads": 2})]
    registry = Registry(entries)
    buf = io.BytesIO()
    _edges().save(buf, format="PNG")
    try:
        app = create_app(registry, ServerConfig(tuple(entries), Limits(max_queue=2, result_ttl_s=3.0), "k"))
        with TestClient(app, headers={"Authorization": "Bearer k"}) as client:
            def post(model: str, **fields: str):
                return client.post("/v1/images/edits", data={"model": model, "prompt": PROMPT, "steps": "2",
                                                             "seed": "4", **fields},
                                   files={"control_image": ("c.png", buf.getvalue(), "image/png")})

            def image(r) -> np.ndarray:
                assert r.status_code == 200, r.text
                return _a(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))))
            guided, plain = image(post("zc", control_strength="1.0")), image(post("zc", control_strength="0"))
            assert guided.shape == (SIZE, SIZE, 3) and not np.array_equal(guided, plain)
            bad = post("zc", control_strength="3")
            assert bad.status_code in (400, 422) and "control_strength" in json.dumps(bad.json())
            none = post("z")
            assert none.status_code == 400 and "ControlNet" in none.text
    finally:
        registry.close()
