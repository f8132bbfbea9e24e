"""The command line: sd-cli's flags verbatim, a resident process for many prompts, PNG
metadata, Ctrl-C, convert. Runs ``python -m sdcpp_py`` in subprocesses on the tiny
synthetic models; the articles' commands are compared with upstream sd-cli's images."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdcpp_py import Pipeline, read_parameters
from sdcpp_py.modelfile import inspect
from sdcpp_py.synthetic import write_model_set

CLI = [sys.executable, "-m", "sdcpp_py"]


def run_cli(*args: str, cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def summary(run: subprocess.CompletedProcess) -> dict:
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(run.stdout[run.stdout.index("{\n"):])


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def q4(model_dir):
    return {f: write_model_set(f, model_dir / "q4", size="tiny", seed=3, dit_type="q4_0", llm_type="q4_0")
            for f in ("z-image-turbo", "flux2-klein")}


# The articles' commands, sizes scaled down (and -t to this machine's 2 cores), flags otherwise verbatim.
ARTICLES = {
    "z-image-turbo": ["--diffusion-model", "{dit}", "--vae", "{vae}", "--llm", "{llm}", "--cfg-scale", "1.0",
                      "--steps", "3", "-p", "a red fox in the snow, photograph", "-H", "128", "-W", "128",
                      "-t", "2"],
    "flux2-klein": ["--diffusion-model", "{dit}", "--vae", "{vae}", "--llm", "{llm}", "--cfg-scale", "1.0",
                    "--steps", "4", "-p", "a blue teapot on a wooden table", "-H", "144", "-W", "256",
                    "-o", "out.png"],
}


def article(family: str, models) -> list[str]:
    files = {"{dit}": str(models.diffusion_model), "{vae}": str(models.vae), "{llm}": str(models.llm)}
    return [files.get(a, a) for a in ARTICLES[family]]


def output_of(cmd: list[str]) -> str:
    return cmd[cmd.index("-o") + 1] if "-o" in cmd else "output.png"


@pytest.mark.parametrize("family", ["z-image-turbo", "flux2-klein"])
def test_article_command_matches_sd_cli(family, tiny_sets, q4, sd_cli, tmp_path):
    """Our defaults run the article's command; with --upcast none (weights as stored) the
    image equals sd-cli's bit for bit, for F16 files and for Q4_0 files (sd-cli told to place
    them in ggml's repacked buffers as our default does, and both plain)."""
    for name, models in (("f16", tiny_sets[family]), ("q4_0", q4[family])):
        cmd = article(family, models)
        work = tmp_path / name
        work.mkdir()
        ours = summary(run_cli(*cmd, cwd=work))
        out = work / output_of(cmd)
        assert ours["outputs"] == [output_of(cmd)] and ours["seeds"] == [42]   # sd-cli's default seed
        assert ours["loads"] == 1 and out.is_file()
        theirs_dir = work / "sd-cli"
        theirs_dir.mkdir()
        env = {**os.environ, "SD_CPU_WEIGHT_BUFFERS": "CPU_REPACK"}
        run = subprocess.run([str(sd_cli), *cmd], cwd=theirs_dir, capture_output=True, text=True, timeout=600,
                             env=env)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        theirs = pixels(theirs_dir / output_of(cmd))
        assert theirs.std() > 1.0
        (work / "asis").mkdir()
        summary(run_cli(*cmd, "--upcast", "none", cwd=work / "asis"))
        assert np.array_equal(pixels(work / "asis" / output_of(cmd)), theirs), (family, name)
        if name == "q4_0":   # plain kernels on both sides
            plain = work / "plain"
            plain.mkdir()
            summary(run_cli(*cmd, "--upcast", "none", "--repack", "none", cwd=plain))
            run = subprocess.run([str(sd_cli), *cmd, "-o", str(plain / "theirs.png")], cwd=plain,
                                 capture_output=True, text=True, timeout=600)
            assert run.returncode == 0, run.stderr[-2000:]
            assert np.array_equal(pixels(plain / output_of(cmd)), pixels(plain / "theirs.png"))


def test_one_prompt_frees_the_encoder_once_encoded(tiny_sets, tmp_path):
    """A run with one prompt (any number of seeds) frees the text encoder once the prompt is
    encoded, as sd-cli does, with the same pixels; --keep-encoder keeps it."""
    m = tiny_sets["z-image-turbo"]
    base = ["--diffusion-model", str(m.diffusion_model), "--llm", str(m.llm), "--vae", str(m.vae), "-p", "a lighthouse",
            "--seeds", "3,4", "-W", "64", "-H", "48", "--steps", "2", "-t", "2", "-o", "img-{seed}.png"]
    (tmp_path / "freed").mkdir()
    (tmp_path / "kept").mkdir()
    freed = summary(run_cli(*base, cwd=tmp_path / "freed"))
    kept = summary(run_cli(*base, "--keep-encoder", cwd=tmp_path / "kept"))
    assert not freed["encoder_loaded"] and kept["encoder_loaded"]
    assert freed["encodes"] == kept["encodes"] == 1
    for name in ("img-3.png", "img-4.png"):
        assert np.array_equal(pixels(tmp_path / "freed" / name), pixels(tmp_path / "kept" / name))


def test_prompt_file_seeds_one_load_one_encoding_per_prompt(tiny_sets, pipelines, tmp_path):
    """3 prompts x 2 seeds (+ a JSON line with its own settings): one load, one encoding per
    prompt (the engine logs each text encoding), images as generate() makes them."""
    m = tiny_sets["z-image-turbo"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a lighthouse at dawn\n\n# a comment\na harbour at night\n"
                       + json.dumps({"prompt": "a forest path", "steps": 3, "width": 96, "seed": 7}) + "\n")
    run = run_cli("--diffusion-model", str(m.diffusion_model), "--llm", str(m.llm), "--vae", str(m.vae),
                  "--prompt-file", str(prompts), "--seeds", "11,12", "-W", "64", "-H", "64", "--steps", "2",
                  "-o", "img-{prompt_index}-{seed}.png", "-t", "2", "-v", cwd=tmp_path)
    s = summary(run)
    assert s["loads"] == 1 and s["encodes"] == 3 and s["prompts"] == 3
    assert s["encoder_loaded"]       # three prompts: the encoder stays for the next one
    assert run.stderr.count("get_learned_condition completed") == 3
    assert run.stderr.count("sampling completed") == 5
    assert s["outputs"] == ["img-0-11.png", "img-0-12.png", "img-1-11.png", "img-1-12.png", "img-2-7.png"]
    assert s["seeds"] == [11, 12, 11, 12, 7]
    pipe = pipelines["z-image-turbo"]
    expect = pipe.generate("a harbour at night", width=64, height=64, steps=2, seed=12).arrays[0]
    assert np.array_equal(pixels(tmp_path / "img-1-12.png"), expect)
    forest = read_parameters(tmp_path / "img-2-7.png").settings
    assert (forest.prompt, forest.steps, forest.width, forest.height, forest.seed) == ("a forest path", 3, 96, 64, 7)
    assert np.array_equal(pixels(tmp_path / "img-2-7.png"),
                          pipe.generate("a forest path", width=96, height=64, steps=3, seed=7).arrays[0])


def test_batch_names_follow_sd_cli(tiny_sets, tmp_path):
    m = tiny_sets["flux2-klein"]
    base = ["--diffusion-model", str(m.diffusion_model), "--llm", str(m.llm), "--vae", str(m.vae),
            "-p", "x", "-W", "64", "-H", "64", "--steps", "1", "-t", "2", "-s", "5", "-b", "2", "--no-progress"]
    assert summary(run_cli(*base, "-o", "a/pic.png", cwd=tmp_path))["outputs"] == ["a/pic_0.png", "a/pic_1.png"]
    s = summary(run_cli(*base, "-o", "b/frame_%03d.png", "--output-begin-idx", "4", cwd=tmp_path))
    assert s["outputs"] == ["b/frame_004.png", "b/frame_005.png"] and s["seeds"] == [5, 6]
    assert (tmp_path / "b" / "frame_005.png").is_file()


def test_png_metadata_info_and_from_png(tiny_sets, sd_cli, tmp_path):
    """Every image carries its settings in sd-cli's layout; info prints them; --from-png
    regenerates the same pixels, from our images and from sd-cli's."""
    m = tiny_sets["flux2-klein"]
    files = ["--diffusion-model", str(m.diffusion_model), "--llm", str(m.llm), "--vae", str(m.vae), "-t", "2"]
    summary(run_cli(*files, "-p", "a red kite", "-n", "blurry", "-W", "80", "-H", "64", "--steps", "3",
                    "--cfg-scale", "2.5", "--sampling-method", "euler", "-s", "99", "-o", "first.png", cwd=tmp_path))
    text = Image.open(tmp_path / "first.png").info["parameters"]
    lines = text.split("\n")
    assert lines[0] == "a red kite" and lines[1] == "Negative prompt: blurry"
    assert lines[2].startswith("Steps: 3, CFG scale: 2.500000, Guidance: ")
    for item in ("Seed: 99", "Size: 80x64", "Sampler: euler", f"Unet: {m.diffusion_model.name}",
                 f"TE: {m.llm.name}", f"VAE: {m.vae.name}", "Version: stable-diffusion.cpp, SDCPP: {"):
        assert item in lines[2], item
    params = read_parameters(tmp_path / "first.png")
    assert set(params.hashes) == {"diffusion_model", "llm", "vae"} and all(len(h) == 10 for h in params.hashes.values())
    assert params.weights["per_component"]["diffusion"]["file_type"] == "F16"
    info = run_cli("info", str(tmp_path / "first.png"), cwd=tmp_path)
    assert info.returncode == 0 and info.stdout.strip() == text
    as_json = json.loads(run_cli("info", str(tmp_path / "first.png"), "--metadata-format", "json",
                                 cwd=tmp_path).stdout)
    assert as_json["schema"] == "sdcpp.image.params/v1" and as_json["seed"] == 99
    assert as_json["sampling"]["guidance"]["txt_cfg"] == 2.5

    summary(run_cli(*files, "--from-png", "first.png", "-o", "again.png", cwd=tmp_path))
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "first.png"))
    summary(run_cli(*files, "--from-png", "first.png", "-s", "100", "-o", "other.png", cwd=tmp_path))
    assert read_parameters(tmp_path / "other.png").settings.seed == 100
    assert not np.array_equal(pixels(tmp_path / "other.png"), pixels(tmp_path / "first.png"))

    run = subprocess.run([str(sd_cli), *files, "-p", "a green boat", "-W", "64", "-H", "64", "--steps", "2",
                          "--cfg-scale", "1", "-s", "3", "-o", "theirs.png"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = read_parameters(tmp_path / "theirs.png")
    assert theirs.source == "sd-cli" and theirs.settings.prompt == "a green boat" and theirs.settings.seed == 3
    summary(run_cli(*files, "--from-png", "theirs.png", "-o", "ours.png", cwd=tmp_path))
    assert np.array_equal(pixels(tmp_path / "ours.png"), pixels(tmp_path / "theirs.png"))


@pytest.mark.parametrize("argv, named", [
    (["--foo", "1"], "--foo"),
    (["--control-net-cpu"], "--control-net-cpu"),
    (["--steps", "three"], "--steps"),
    (["--step", "3"], "--step"),
    (["-M", "vid_gen"], "vid_gen"),
    (["-M", "paint"], "paint"),
    (["--preview", "fancy"], "--preview"),
])
def test_bad_flags_one_line_exit_2(argv, named, tmp_path):
    run = run_cli("-p", "x", "--diffusion-model", "none.gguf", *argv, cwd=tmp_path)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdcpp-py: error:") and named in lines[0], run.stderr


def test_bad_inputs_clear_errors(tiny_sets, tmp_path):
    m = tiny_sets["z-image-turbo"]
    files = ["--diffusion-model", str(m.diffusion_model), "--llm", str(m.llm), "--vae", str(m.vae)]
    for argv, needle in ((["-p", "x", "-W", "100"], "multiple of 16"),
                         (["-p", "x", "-i", "missing.png"], "missing.png"),
                         (["--prompt-file", "nope.txt"], "nope.txt"),
                         (["-p", "x", "--seed-range", "5:2"], "--seed-range")):
        run = run_cli(*files, *argv, "--no-progress", cwd=tmp_path)
        assert run.returncode == 2 and needle in run.stderr, (argv, run.stderr[-500:])
    bad = tmp_path / "bad.txt"
    bad.write_text('{"prompt": "x", "colour": "red"}\n')
    run = run_cli(*files, "--prompt-file", str(bad), cwd=tmp_path)
    assert run.returncode == 2 and "line 1" in run.stderr and "colour" in run.stderr


def test_help_groups_and_module_entry(tmp_path):
    run = run_cli("--help", cwd=tmp_path)
    assert run.returncode == 0
    for group in ("CLI Options:", "Context Options:", "Generation Options:", "--sampling-method", "--fa",
                  "--prompt-file", "--preset"):
        assert group in run.stdout
    script = Path(sys.executable).parent / "sdcpp-py"
    if script.exists():
        assert subprocess.run([str(script), "--help"], capture_output=True, text=True).stdout == run.stdout


def test_ctrl_c_stops_mid_step_exit_130_keeps_written_images(tiny_sets, tmp_path):
    m = tiny_sets["z-image-turbo"]
    proc = subprocess.Popen([*CLI, "--diffusion-model", str(m.diffusion_model), "--llm", str(m.llm), "--vae",
                             str(m.vae), "-p", "a quiet street", "-W", "512", "-H", "512", "--steps", "120",
                             "--seeds", "1,2,3", "-t", "2", "-o", "street_%d.png"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # as from a terminal, even when this test runs in the background (SIGINT ignored)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "street_0.png").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.2)
        time.sleep(3.0)        # well into the second image's steps (~6 s of them on 2 cores)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        stopped = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "1 of 3 images written" in err and "image 2/3" in err
    assert stopped < 10, stopped
    assert pixels(tmp_path / "street_0.png").shape == (512, 512, 3)
    assert not (tmp_path / "street_1.png").exists()
    assert json.loads(out[out.index("{\n"):])["outputs"] == ["street_0.png"]


def test_convert_round_trip(tiny_sets, sd_cli, tmp_path):
    """convert (sd-cli's -M convert, and our subcommand) writes the file sd-cli writes: the same
    tensors, types and size (the engine's tensor order varies between runs), and the same pixels."""
    m = tiny_sets["z-image-turbo"]
    out = tmp_path / "dit-q8_0.gguf"
    run = run_cli("-M", "convert", "-m", str(m.diffusion_model), "-o", str(out), "--type", "q8_0", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout[run.stdout.index("{\n"):])
    assert report["types"].get("Q8_0", 0) > 0
    f = inspect(out)
    blocks = [t for t in f.tensors.values() if len(t.shape) == 2 and ("refiner." in t.name or "layers." in t.name)]
    assert blocks and all(t.dtype == "Q8_0" for t in blocks)
    theirs = subprocess.run([str(sd_cli), "-M", "convert", "-m", str(m.diffusion_model), "-o", "theirs.gguf",
                             "--type", "q8_0"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert theirs.returncode == 0, theirs.stderr[-2000:]
    theirs_file = inspect(tmp_path / "theirs.gguf")
    assert theirs_file.tensors == f.tensors and (tmp_path / "theirs.gguf").stat().st_size == out.stat().st_size
    again = summary(run_cli("convert", "-m", str(m.diffusion_model), "-o", "second.gguf", "--type", "q8_0",
                            "--no-progress", cwd=tmp_path))
    assert again["output"].endswith("second.gguf") and inspect(tmp_path / "second.gguf").tensors == f.tensors
    assert not list(tmp_path.glob(".*.gguf"))       # no temporary file left
    assert (out.stat().st_mode & 0o777) != 0o600    # not mkstemp's private mode
    images = []
    for path in (out, tmp_path / "theirs.gguf"):
        with Pipeline(diffusion_model=path, llm=m.llm, vae=m.vae, n_threads=2) as converted:
            assert converted.weight_plan.per_component["diffusion"].file_type == "Q8_0"
            images.append(converted.generate("a fox", width=64, height=64, steps=2, seed=1).arrays[0])
    assert images[0].shape == (64, 64, 3) and images[0].std() > 1.0 and np.array_equal(*images)
    run = run_cli("convert", "-m", str(tmp_path / "missing.gguf"), "-o", "x.gguf", cwd=tmp_path)
    assert run.returncode == 2 and "missing.gguf" in run.stderr


def test_preview_written_during_sampling(tiny_sets, tmp_path):
    m = tiny_sets["flux2-klein"]
    summary(run_cli("--diffusion-model", str(m.diffusion_model), "--llm", str(m.llm), "--vae", str(m.vae),
                    "-p", "x", "-W", "64", "-H", "64", "--steps", "2", "-t", "2", "--preview", "proj",
                    "--preview-path", "p/preview.png", cwd=tmp_path))
    preview = Image.open(tmp_path / "p" / "preview.png")
    assert preview.mode == "RGB" and 1 <= preview.width <= 64


def test_metadata_round_trip_odd_prompts(tmp_path):
    from sdcpp_py import GenerationSettings, ImageParameters, InvalidArgumentError
    from sdcpp_py.metadata import save_png

    s = GenerationSettings(prompt='一只猫, SDCPP: {"x": 1}', negative_prompt="ß", width=64, height=48, seed=7)
    back = ImageParameters.from_text(ImageParameters(s, {"vae": "v.gguf"}).to_text()).settings
    assert (back.prompt, back.negative_prompt, back.seed) == (s.prompt, "ß", 7)
    save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png", ImageParameters(s))
    assert read_parameters(tmp_path / "a.png").settings.prompt == s.prompt
    from PIL import PngImagePlugin  # sd-cli's way: raw UTF-8 in a tEXt chunk
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", ImageParameters(s).to_text().encode("utf-8").decode("latin-1"))
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png", pnginfo=info)
    assert read_parameters(tmp_path / "b.png").settings.prompt == s.prompt
    with pytest.raises(InvalidArgumentError):
        ImageParameters.from_text('x\nSteps: 1, SDCPP: {"schema": "sdcpp.image.params/v1", "sdcpp_py": '
                                  '{"settings": {"prompt": "x", "colour": 1}}}')
