"""sd-cli's other image flags that apply to these families, through the request: each changes the
image, and sd-cli with the same flags makes the same pixels; those that do not apply are refused
saying why."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from PIL import Image

from sdcpp_py import InvalidArgumentError, Pipeline, read_parameters
from sdcpp_py.backends import cpu_kernels
from sdcpp_py.cli import main
from sdcpp_py.cli.sdcli import build_parser, context_settings

KW = dict(width=64, height=64, steps=3, seed=5)


def _files(m):
    return {"diffusion_model": m.diffusion_model, "llm": m.llm, "vae": m.vae}


def _cli_round_trip(m, tmp_path, flags: list[str], expected: np.ndarray) -> dict:
    """The command line with ``flags`` (KW's generation) makes ``expected``, and ``--from-png`` of
    its PNG makes it again; returns the PNG's stored context settings."""
    files = ["--diffusion-model", str(m.diffusion_model), "--llm", str(m.llm), "--vae", str(m.vae), "-t", "2",
             "--no-progress"]
    out, again = tmp_path / "cli.png", tmp_path / "again.png"
    assert main([*files, "-p", "a lighthouse", "-W", "64", "-H", "64", "--steps", "3", "-s", "5", *flags,
                 "-o", str(out)]) == 0
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), expected)
    assert main([*files, "--from-png", str(out), "-o", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(again).convert("RGB")), expected)
    return read_parameters(out).context


@pytest.mark.parametrize("fam, flags, settings, context", [
    ("z-image-turbo", ["--sampling-method", "euler_a", "--eta", "0.3"], {"sampler": "euler_a", "eta": 0.3}, {}),
    ("z-image-turbo", ["--vae-tiling", "--vae-tile-size", "4x4", "--vae-tile-overlap", "0.25"],
     {"vae_tiling": True, "vae_tile_size": (4, 4), "vae_tile_overlap": 0.25}, {}),
    ("z-image-turbo", ["--vae-tiling", "--vae-relative-tile-size", "0.5x0.5"],
     {"vae_tiling": True, "vae_relative_tile_size": (0.5, 0.5)}, {}),
    ("flux2-klein", ["--slg-scale", "2", "--skip-layers", "[0]", "--skip-layer-start", "0", "--skip-layer-end", "1"],
     {"slg_scale": 2.0, "skip_layers": (0,), "skip_layer_start": 0.0, "skip_layer_end": 1.0}, {}),
    ("flux2-klein", ["--circular"], {}, {"circular_x": True, "circular_y": True}),
    ("z-image-turbo", ["--circularx"], {}, {"circular_x": True}),
])
def test_option_changes_the_image_as_sd_cli_does(sd_cli, tiny_sets, pipelines, tmp_path, fam, flags, settings,
                                                context):
    m = tiny_sets[fam]
    with Pipeline(**_files(m), n_threads=2, **context) as pipe:
        ours = pipe.generate("a lighthouse", **settings, **KW)
    base = pipelines[fam].generate("a lighthouse", vae_tiling=settings.get("vae_tiling", False),
                                   sampler=settings.get("sampler"), **KW).arrays[0]
    assert np.abs(ours.arrays[0].astype(int) - base).mean() > 0.5
    files = ["--diffusion-model", str(m.diffusion_model), "--llm", str(m.llm), "--vae", str(m.vae)]
    common = [*files, "-p", "a lighthouse", "-W", "64", "-H", "64", "--steps", "3", "-s", "5", "-t", "2",
              "--cfg-scale", "1", *flags]
    run = subprocess.run([str(sd_cli), *common, "-o", str(tmp_path / "cli.png")], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = np.asarray(Image.open(tmp_path / "cli.png").convert("RGB"))
    assert np.array_equal(ours.arrays[0], theirs)
    assert main([*common, "-o", str(tmp_path / "ours.png"), "--no-progress"]) == 0      # our CLI, same flags
    assert np.array_equal(np.asarray(Image.open(tmp_path / "ours.png").convert("RGB")), theirs)


def test_options_that_do_not_apply_are_refused(pipelines, capsys):
    with pytest.raises(InvalidArgumentError, match="Z-Image DiT skips no layers"):
        pipelines["z-image-turbo"].generate("x", slg_scale=2.0, skip_layers=(3,), **KW)
    for flag, why in (("--timestep-shift", "SDXL-only"), ("--increase-ref-index", "own index"),
                      ("--control-net-cpu", "DiT's graph"), ("--clip_l", "Qwen3 alone"), ("--fps", "video")):
        assert main(["-p", "x", "--diffusion-model", "m.gguf", flag, "1"]) == 2
        assert why in capsys.readouterr().err, flag
    for bad in ({"vae_tile_size": (4,)}, {"vae_tile_overlap": 2.0}, {"eta": -1.0}, {"skip_layers": "7"}):
        with pytest.raises((InvalidArgumentError, TypeError)):
            pipelines["flux2-klein"].generate("x", **bad, **KW)


def test_references_at_their_own_size(pipelines):
    """The staged loop fits references to the image's budget as sd-cli does; with
    auto_resize_ref_image off they reach the engine as given, as one-shot sends them."""
    from sdcpp_py._images import prepare

    ref = Image.fromarray((np.random.default_rng(0).random((192, 96, 3)) * 255).astype(np.uint8))
    assert prepare(64, 64, None, [ref])[1][0].size == (32, 80)          # within 64x64 pixels, sides of 16
    assert prepare(64, 64, None, [ref], fit=False)[1][0].size == (96, 192)
    pipe = pipelines["flux2-klein"]
    s = pipe.settings_for("x", auto_resize_ref_image=False, **KW)
    staged = np.asarray(next(pipe.images(s, ref_images=[ref])).image)
    assert np.array_equal(staged, pipe.generate("x", ref_images=[ref], auto_resize_ref_image=False, **KW).arrays[0])
    with pytest.raises(InvalidArgumentError, match="multiples of 16"):
        pipe.generate("x", ref_images=[Image.new("RGB", (40, 40))], auto_resize_ref_image=False, **KW)


@pytest.mark.parametrize("fam", ["z-image-turbo", "flux2-klein"])
def test_bf16_vae_weights(tiny_sets, pipelines, tmp_path, fam):
    """vae_weights='bf16': the VAE's convolutions run on BF16 weights and BF16 input rows
    (vendor/patches/0014, 0017). The image moves by rounding only; the CLI flag, staged calls and
    the PNG's parameters agree."""
    m = tiny_sets[fam]
    f16 = pipelines[fam].generate("a lighthouse", **KW).arrays[0].astype(int)
    with Pipeline(**_files(m), n_threads=2, vae_weights="bf16") as pipe:
        result = pipe.generate("a lighthouse", **KW)
        bf16 = result.arrays[0].astype(int)
        assert not np.array_equal(bf16, f16)                  # the BF16 convolutions ran
        assert np.abs(bf16 - f16).mean() < 1.0 and f16.std() > 5.0
        staged = next(pipe.images(pipe.settings_for("a lighthouse", **KW))).image
        assert np.array_equal(np.asarray(staged), bf16)
    # a later context without the setting is F16 again (the engine's switch is per creation)
    with Pipeline(**_files(m), n_threads=2) as plain:
        assert np.array_equal(plain.generate("a lighthouse", **KW).arrays[0], f16)
    context = _cli_round_trip(m, tmp_path, ["--vae-weights", "bf16"], bf16)
    assert context.get("vae_weights") == "bf16"
    with pytest.raises(InvalidArgumentError, match="vae_weights"):
        Pipeline(**_files(m), vae_weights="fp8")


@pytest.mark.parametrize("fam", ["z-image-turbo", "flux2-klein"])
def test_bf16_attention(tiny_sets, pipelines, tmp_path, fam):
    """bf16_attention (default on): where the CPU module has AVX512-BF16, the DiT's and the VAE's
    attention run on BF16 flash tiles (vendor/patches/0020) and the image moves by rounding only;
    elsewhere the setting changes nothing. ``bf16_attention=False``, ``--f32-attention`` and the
    PNG's parameters give the F32 path's image bit for bit."""
    m = tiny_sets[fam]
    default = pipelines[fam].generate("a lighthouse", **KW).arrays[0].astype(int)
    with Pipeline(**_files(m), n_threads=2, bf16_attention=False) as pipe:
        f32 = pipe.generate("a lighthouse", **KW).arrays[0].astype(int)
    if "AVX512_BF16" in cpu_kernels().features:
        assert not np.array_equal(default, f32)               # the BF16 tiles ran
        assert np.abs(default - f32).mean() < 0.5 and np.abs(default - f32).max() <= 2 and f32.std() > 5.0
    else:
        assert np.array_equal(default, f32)
    assert _cli_round_trip(m, tmp_path, ["--f32-attention"], f32).get("bf16_attention") is False
    with pytest.raises(TypeError, match="bf16_attention"):
        Pipeline(**_files(m), bf16_attention="no")
    # parameters without the setting (sd-cli's images) take the engine's default, as sd-cli runs it
    args = build_parser().parse_args(["--diffusion-model", "x", "-p", "y"])
    assert context_settings(args, {"rng": "cuda"})["bf16_attention"] is True
    assert context_settings(args, {"bf16_attention": False})["bf16_attention"] is False
    f32 = build_parser().parse_args(["--diffusion-model", "x", "-p", "y", "--f32-attention"])
    assert context_settings(f32, {"bf16_attention": True})["bf16_attention"] is False
