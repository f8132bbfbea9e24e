"""LoRA: per call, several at once, through the request from every face; applied at run time so
the base weights stay as they were (a call without LoRA after one with it gives the base image
bit for bit); what the engine cannot apply whole is refused, naming the file."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from PIL import Image

from sdcpp_py import IncompatibleModelError, InvalidArgumentError, ModelNotFoundError, Pipeline, read_parameters
from sdcpp_py.synthetic import write_lora, write_model_set

KW = dict(width=64, height=64, steps=2, seed=5)


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    return {
        "z": write_lora(d / "zimage-style.safetensors", "z-image-turbo", rank=4, alpha=2.0, seed=3, std=0.5),
        "z2": write_lora(d / "zimage-detail.safetensors", "z-image-turbo", rank=8, seed=4, std=0.3),
        "z-te": write_lora(d / "zimage-te.safetensors", "z-image-turbo", rank=4, encoder=True, seed=6, std=0.5),
        "z-kohya": write_lora(d / "zimage-kohya.safetensors", "z-image-turbo", layout="kohya", seed=3, std=0.5),
        "k": write_lora(d / "klein-style.safetensors", "flux2-klein", rank=4, seed=3, std=0.5),
        "k-kohya": write_lora(d / "klein-kohya.safetensors", "flux2-klein", layout="kohya", alpha=4.0, seed=3,
                              std=0.5),
        "dir": d,
    }


def _files(m):
    return {"diffusion_model": m.diffusion_model, "llm": m.llm, "vae": m.vae}


@pytest.mark.parametrize("fam, key", [("z-image-turbo", "z"), ("flux2-klein", "k"), ("flux2-klein", "k-kohya")])
def test_a_lora_changes_the_image_and_leaves_the_base_as_it_was(pipelines, tiny_sets, loras, fam, key):
    pipe = pipelines[fam]
    base = pipe.generate("a lighthouse", **KW).arrays[0]
    styled = pipe.generate("a lighthouse", loras=[(str(loras[key]), 1.0)], **KW)
    assert np.abs(styled.arrays[0].astype(int) - base).mean() > 1.0
    assert styled.settings.loras == ((str(loras[key]), 1.0),)
    half = pipe.generate("a lighthouse", loras=[(str(loras[key]), 0.5)], **KW).arrays[0]
    assert not np.array_equal(half, styled.arrays[0]) and not np.array_equal(half, base)
    # multiplier 0 is no LoRA, bit for bit; a call without LoRA after one with it is the base image
    assert np.array_equal(pipe.generate("a lighthouse", loras=[(str(loras[key]), 0.0)], **KW).arrays[0], base)
    assert np.array_equal(pipe.generate("a lighthouse", **KW).arrays[0], base)
    with Pipeline(**_files(tiny_sets[fam]), n_threads=2) as fresh:
        assert np.array_equal(fresh.generate("a lighthouse", **KW).arrays[0], base)
    # staged == one-shot, with the LoRA
    s = pipe.settings_for("a lighthouse", loras=[(str(loras[key]), 1.0)], **KW)
    assert np.array_equal(np.asarray(next(pipe.images(s)).image), styled.arrays[0])


def test_several_loras_and_the_text_encoder(pipelines, loras):
    pipe = pipelines["z-image-turbo"]
    one = pipe.generate("a harbour", loras=[(str(loras["z"]), 1.0)], **KW).arrays[0]
    two = pipe.generate("a harbour", loras=[(str(loras["z"]), 1.0), (str(loras["z2"]), 1.0)], **KW).arrays[0]
    assert not np.array_equal(one, two)
    # a DiT LoRA leaves the encoding (and its cache entry) alone; a text encoder LoRA changes both
    misses = pipe.encodings.info().misses
    plain = pipe.encode("a quiet bay")
    assert pipe.encode("a quiet bay", loras=[(str(loras["z"]), 1.0)]) is plain
    te = pipe.encode("a quiet bay", loras=[(str(loras["z-te"]), 1.0)])
    assert pipe.encodings.info().misses == misses + 2
    assert np.abs(te.context - plain.context).max() > 1e-3
    assert np.array_equal(pipe.encode("a quiet bay").context, plain.context)      # cleared again
    staged = next(pipe.images(pipe.settings_for("a quiet bay", loras=[(str(loras["z-te"]), 1.0)], **KW))).image
    oneshot = pipe.generate("a quiet bay", loras=[(str(loras["z-te"]), 1.0)], **KW).image
    assert np.array_equal(np.asarray(staged), np.asarray(oneshot))


def test_bad_loras_raise_and_the_pipeline_stays_usable(pipelines, tiny_sets, loras):
    pipe = pipelines["z-image-turbo"]
    cases = [(str(loras["k"]), IncompatibleModelError, "for a FLUX model"),
             (str(tiny_sets["z-image-turbo"].vae), IncompatibleModelError, "not a LoRA"),
             (str(loras["dir"] / "missing.safetensors"), ModelNotFoundError, "not found"),
             (str(loras["z-kohya"]), InvalidArgumentError, "reads 8 of its 14")]       # the engine's kohya names
    for path, kind, message in cases:
        with pytest.raises(kind, match=message):
            pipe.generate("a lighthouse", loras=[(path, 1.0)], **KW)
    with pytest.raises(InvalidArgumentError, match="multiplier"):
        pipe.generate("a lighthouse", loras=[(str(loras["z"]), 50.0)], **KW)
    with pytest.raises(TypeError):
        pipe.generate("a lighthouse", loras="style.safetensors", **KW)
    with pytest.raises(IncompatibleModelError):
        pipelines["flux2-klein"].generate("x", loras=[(str(loras["z"]), 1.0)], **KW)
    assert pipe.generate("a lighthouse", **KW).image.size == (64, 64)
    with pytest.raises(InvalidArgumentError, match="repack='none'"):
        Pipeline(**_files(tiny_sets["z-image-turbo"]), lora_apply_mode="immediately")


def test_lora_in_isolated_mode(tiny_sets, pipelines, loras):
    ref = pipelines["z-image-turbo"].generate("a lighthouse", loras=[(str(loras["z"]), 0.8)], **KW).arrays[0]
    with Pipeline(**_files(tiny_sets["z-image-turbo"]), n_threads=2, isolate=True) as iso:
        assert np.array_equal(iso.generate("a lighthouse", loras=[(str(loras["z"]), 0.8)], **KW).arrays[0], ref)


def test_cli_prompt_syntax_equals_sd_cli_and_the_api(sd_cli, tiny_sets, pipelines, loras, tmp_path):
    from sdcpp_py.cli import main

    m = tiny_sets["z-image-turbo"]
    files = ["--diffusion-model", str(m.diffusion_model), "--llm", str(m.llm), "--vae", str(m.vae)]
    prompt = "a lighthouse <lora:zimage-style:0.8>"
    common = [*files, "-p", prompt, "-W", "64", "-H", "64", "--steps", "2", "-s", "5", "-t", "2",
              "--lora-model-dir", str(loras["dir"]), "--cfg-scale", "1"]
    assert main([*common, "-o", str(tmp_path / "ours.png"), "--no-progress"]) == 0
    run = subprocess.run([str(sd_cli), *common, "--lora-apply-mode", "at_runtime", "-o", str(tmp_path / "cli.png")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    ours = np.asarray(Image.open(tmp_path / "ours.png").convert("RGB"))
    assert np.array_equal(ours, np.asarray(Image.open(tmp_path / "cli.png").convert("RGB")))
    api = pipelines["z-image-turbo"].generate("a lighthouse ", loras=[(str(loras["z"]), 0.8)], **KW).arrays[0]
    assert np.array_equal(ours, api)
    stored = read_parameters(tmp_path / "ours.png")
    assert stored.settings.loras == ((str(loras["z"]), 0.8),) and "lora zimage-style.safetensors" in stored.hashes
    # --from-png makes it again; a prompt file's "loras" key too
    assert main([*files, "--from-png", str(tmp_path / "ours.png"), "-o", str(tmp_path / "again.png"),
                 "-t", "2", "--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png").convert("RGB")), ours)
    lines = tmp_path / "prompts.txt"
    lines.write_text(json.dumps({"prompt": "a lighthouse ", "loras": [[str(loras["z"]), 0.8]]}) + "\n")
    assert main([*files, "--prompt-file", str(lines), "-W", "64", "-H", "64", "--steps", "2", "-s", "5", "-t", "2",
                 "-o", str(tmp_path / "line.png"), "--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "line.png").convert("RGB")), ours)
    assert main([*files, "-p", "x <lora:nope:1>", "--lora-model-dir", str(loras["dir"]), "-o",
                 str(tmp_path / "x.png")]) == 2


def test_server_names_loras_in_its_folder(tiny_sets, pipelines, loras):
    testclient = pytest.importorskip("fastapi.testclient")
    from sdcpp_py.server import Limits, Registry, ServerConfig, create_app, model_set

    m = tiny_sets["z-image-turbo"]
    entry = model_set("z", {**{k: str(v) for k, v in _files(m).items()}, "settings": {"n_threads": 2}})
    registry = Registry([entry])
    try:
        body = {"prompt": "a lighthouse", "size": "64x64", "steps": 2, "seed": 5, "loras": [["zimage-style", 0.8]]}
        with testclient.TestClient(create_app(registry, ServerConfig((entry,), Limits(), lora_dir=loras["dir"]))) as c:
            r = c.post("/v1/images/generations", json=body)
            assert r.status_code == 200, r.text
            import base64
            import io
            got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).convert("RGB"))
            ref = pipelines["z-image-turbo"].generate("a lighthouse", loras=[(str(loras["z"]), 0.8)], **KW).arrays[0]
            assert np.array_equal(got, ref)
            for bad in (str(loras["z"]), "../zimage-style", "nope", ".hidden"):
                r = c.post("/v1/images/generations", json={**body, "loras": [[bad, 1.0]]})
                assert r.status_code == 400 and r.json()["error"]["param"] == "loras", r.text
                assert str(loras["dir"]) not in r.text
        with testclient.TestClient(create_app(registry, ServerConfig((entry,), Limits()))) as c:
            r = c.post("/v1/images/generations", json=body)
            assert r.status_code == 400 and "no LoRA folder" in r.text
    finally:
        registry.close()


def test_grid_lora_axis_by_content(tiny_sets, loras, tmp_path):
    from sdcpp_py import grid as grids
    from sdcpp_py.batch import run

    m = tiny_sets["z-image-turbo"]
    spec = {"models": {"z": {k: str(v) for k, v in _files(m).items()}},
            "defaults": {"prompt": "a lighthouse", "seed": 5, "size": "64x64", "steps": 2},
            "sweeps": {"lora": {"loras": [[], [f"{loras['z']}:0.8"], [f"{loras['z']}:0.8", f"{loras['z2']}:1"]]}}}
    g = grids.build(spec)
    assert len(g.rows) == 3 and len({r.row_id for r in g.rows}) == 3
    report = run(g, tmp_path / "out", n_threads=2)
    assert report.made == 3
    records = [json.loads((tmp_path / "out" / f"{r.row_id}.json").read_text()) for r in g.rows]
    assert [len(json.loads(rec["settings"])["loras"]) for rec in records] == [0, 1, 2]
    # a LoRA file copied elsewhere under another name: the same rows
    copy = tmp_path / "renamed.safetensors"
    copy.write_bytes(loras["z"].read_bytes())
    moved = grids.build({**spec, "sweeps": {"lora": {"loras": [[f"{copy}:0.8"]]}}})
    assert moved.rows[0].row_id == g.rows[1].row_id


def _read_safetensors(path):
    import struct

    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    kinds = {"F16": np.float16, "F32": np.float32}
    out = {}
    for name, info in header.items():
        if name != "__metadata__":
            a, b = info["data_offsets"]
            out[name] = np.frombuffer(data[8 + n + a:8 + n + b], dtype=kinds[info["dtype"]]).reshape(info["shape"])
    return out, header.get("__metadata__", {})


def test_runtime_lora_equals_the_lora_merged_into_the_file(tmp_path):
    """W + multiplier * alpha / rank * B @ A, written as a new DiT file (F32, so no rounding of
    its own): its image without the LoRA is the base file's with it, within float rounding."""
    from sdcpp_py.synthetic import write_model_set
    from sdcpp_py.synthetic.lora import write_safetensors

    m = write_model_set("z-image-turbo", tmp_path / "st", size="tiny", seed=1, fmt="safetensors", dit_type="f32")
    rank, alpha, multiplier = 4, 2.0, 0.8
    lora = write_lora(tmp_path / "l.safetensors", "z-image-turbo", rank=rank, alpha=alpha, seed=3, std=0.5,
                      dtype="f32")
    weights, meta = _read_safetensors(m.diffusion_model)
    merged = {k: v.copy() for k, v in weights.items()}
    parts, _ = _read_safetensors(lora)
    for name in (k for k in parts if k.endswith(".lora_A.weight")):
        module = name.removeprefix("diffusion_model.").removesuffix(".lora_A.weight")
        delta = multiplier * alpha / rank * (parts[name.replace("lora_A", "lora_B")].astype(np.float64)
                                             @ parts[name].astype(np.float64))
        target, rows = module, slice(None)
        for i, x in enumerate("qkv"):                       # diffusers' to_q/to_k/to_v: rows of the fused qkv
            if module.endswith(f"attention.to_{x}"):
                n = delta.shape[0]
                target, rows = module.removesuffix(f"to_{x}") + "qkv", slice(i * n, (i + 1) * n)
        target = target.replace("to_out.0", "out") + ".weight"
        merged[target][rows] = (merged[target][rows].astype(np.float64) + delta).astype(np.float32)
    assert sum(not np.array_equal(merged[k], weights[k]) for k in weights) == 5      # qkv, out, w1, w2, w3
    merged_file = write_safetensors(tmp_path / "merged-dit.safetensors", merged, meta)

    def latent(dit, **kw):
        with Pipeline(diffusion_model=dit, llm=m.llm, vae=m.vae, n_threads=2) as pipe:
            return pipe.denoise(pipe.encode("a lighthouse"), width=64, height=64, steps=2, seed=5, **kw).data
    runtime = latent(m.diffusion_model, loras=[(str(lora), multiplier)])
    offline = latent(merged_file)
    base = latent(m.diffusion_model)
    assert np.abs(runtime - base).max() > 0.05                               # the LoRA matters ...
    print(f"runtime vs merged: max |diff| {np.abs(runtime - offline).max():.2e}, LoRA effect "
          f"{np.abs(runtime - base).max():.2e}")
    assert np.abs(runtime - offline).max() < 1e-4 * max(1.0, float(np.abs(base).max()))   # ... and is W + BA


@pytest.mark.parametrize("fam, key, dit_type", [("flux2-klein", "k", "q4_k"), ("z-image-turbo", "z", "q4_0")])
def test_merged_into_weights_kept_quantized(tmp_path_factory, loras, fam, key, dit_type):
    """lora_apply_mode='immediately' on a DiT whose weights stay quantized in memory (upcast and
    repack off): the engine merges W + B@A and requantizes (its CPU cast aborted the process before
    vendor/patches/0010). Other LoRAs after merged ones go into weights read again from the file, so
    a call without LoRA is the base image bit for bit. The worker process keeps a regression from
    taking pytest down."""
    m = write_model_set(fam, tmp_path_factory.mktemp(f"q-{fam}"), size="tiny", seed=1, dit_type=dit_type)
    lora, half = [(str(loras[key]), 1.0)], [(str(loras[key]), 0.5)]
    with Pipeline(**_files(m), n_threads=2, upcast="none", repack="none") as runtime:
        base = runtime.generate("a lighthouse", **KW).arrays[0].astype(int)
        at_runtime = runtime.generate("a lighthouse", loras=lora, **KW).arrays[0].astype(int)
        half_at_runtime = runtime.generate("a lighthouse", loras=half, **KW).arrays[0].astype(int)
    with Pipeline(**_files(m), n_threads=2, upcast="none", repack="none", lora_apply_mode="immediately",
                  isolate=True) as merged:
        assert np.array_equal(merged.generate("a lighthouse", **KW).arrays[0], base)
        once = merged.generate("a lighthouse", loras=lora, **KW).arrays[0].astype(int)
        effect = np.abs(at_runtime - base).mean()
        assert effect > 1.0
        # merged and requantized vs added at run time: the same LoRA up to the weights' rounding
        assert np.abs(once - at_runtime).mean() < 0.25 * effect
        assert np.array_equal(merged.generate("a lighthouse", loras=lora, **KW).arrays[0], once)   # kept merged
        halfway = merged.generate("a lighthouse", loras=half, **KW).arrays[0].astype(int)
        assert np.abs(halfway - half_at_runtime).mean() < 0.25 * np.abs(half_at_runtime - base).mean()
        assert np.array_equal(merged.generate("a lighthouse", **KW).arrays[0], base)                # reloaded
        staged = next(merged.images(merged.settings_for("a lighthouse", loras=lora, **KW))).image
        assert np.array_equal(np.asarray(staged), once)


def test_merged_loras_refuse_what_would_lose_or_share_them(tiny_sets, pipelines):
    files = _files(tiny_sets["z-image-turbo"])
    for release in ("release_encoder", "release_diffusion"):
        with pytest.raises(InvalidArgumentError, match="release_encoder/release_diffusion"):
            Pipeline(**files, repack="none", lora_apply_mode="immediately", **{release: True})
    with pytest.raises(InvalidArgumentError, match="shared encoder"):
        Pipeline(**files, n_threads=2, repack="none", lora_apply_mode="immediately",
                 share_encoder_with=pipelines["z-image-turbo"])


def test_a_lora_file_changed_under_its_path_is_read_again(tiny_sets, pipelines, tmp_path):
    """The engine keeps LoRAs applied at run time while they are asked for (vendor/patches/0013);
    a file rewritten under the same path is loaded anew, not served from what it kept."""
    pipe = pipelines["z-image-turbo"]
    path = write_lora(tmp_path / "style.safetensors", "z-image-turbo", rank=4, seed=11, std=0.5)
    first = pipe.generate("a lighthouse", loras=[(str(path), 1.0)], **KW).arrays[0]
    assert np.array_equal(pipe.generate("a lighthouse", loras=[(str(path), 1.0)], **KW).arrays[0], first)
    write_lora(tmp_path / "other.safetensors", "z-image-turbo", rank=4, seed=12, std=0.5).replace(path)
    second = pipe.generate("a lighthouse", loras=[(str(path), 1.0)], **KW).arrays[0]
    assert not np.array_equal(second, first)
    with Pipeline(**_files(tiny_sets["z-image-turbo"]), n_threads=2) as fresh:
        assert np.array_equal(fresh.generate("a lighthouse", loras=[(str(path), 1.0)], **KW).arrays[0], second)
