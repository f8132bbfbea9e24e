"""Presets and the hub download code, against a local fake of the hub's cache layout."""

import hashlib
import os
from pathlib import Path

import pytest

import sdcpp_py
from sdcpp_py import FLUX2_KLEIN_4B, Z_IMAGE_TURBO, InvalidArgumentError, Pipeline, get_preset
from sdcpp_py.presets import download


def test_preset_defaults_follow_the_articles():
    assert (Z_IMAGE_TURBO.steps, Z_IMAGE_TURBO.cfg_scale) == (8, 1.0)
    assert (FLUX2_KLEIN_4B.steps, FLUX2_KLEIN_4B.cfg_scale) == (4, 1.0)
    assert Z_IMAGE_TURBO.width % 16 == 0 and Z_IMAGE_TURBO.width * Z_IMAGE_TURBO.height == 1024 * 1024
    # one text encoder serves both models
    assert Z_IMAGE_TURBO.hub["llm"] == FLUX2_KLEIN_4B.hub["llm"]
    assert get_preset("klein") is FLUX2_KLEIN_4B and get_preset("Z-Image-Turbo") is Z_IMAGE_TURBO
    with pytest.raises(InvalidArgumentError, match="unknown preset"):
        get_preset("sd15")


def test_pipeline_takes_the_family_preset(pipelines):
    assert pipelines["z-image-turbo"].preset is Z_IMAGE_TURBO
    assert pipelines["flux2-klein"].preset is FLUX2_KLEIN_4B
    s = pipelines["flux2-klein"].settings_for("x", seed=5)
    assert (s.steps, s.cfg_scale, s.sampler, s.width) == (4, 1.0, "euler", 1024)


def _fake_hub_cache(root: Path, repo_id: str, files: dict) -> None:
    """Lay files out as huggingface_hub's cache does: blobs, snapshots/<commit>, refs/main."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        data = Path(src).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def test_download_resolves_files_from_the_hub_cache(tiny_sets, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    z = tiny_sets["z-image-turbo"]
    hub = Z_IMAGE_TURBO.hub
    _fake_hub_cache(tmp_path, hub["diffusion_model"].repo_id,
                    {"z_image_turbo-Q8_0.gguf": z.diffusion_model, "z_image_turbo-Q4_K.gguf": z.diffusion_model})
    _fake_hub_cache(tmp_path, hub["llm"].repo_id, {"Qwen3-4B-Instruct-2507-Q4_K_M.gguf": z.llm})
    _fake_hub_cache(tmp_path, hub["vae"].repo_id, {"ae.safetensors": z.vae})

    paths = download("z-image-turbo", quant="Q8_0", cache_dir=str(tmp_path), local_files_only=True)
    assert paths["diffusion_model"].name == "z_image_turbo-Q8_0.gguf"
    assert paths["llm"].name == "Qwen3-4B-Instruct-2507-Q4_K_M.gguf"
    assert paths["vae"].name == "ae.safetensors"
    # what the hub code found is what the engine loads
    with Pipeline(**paths, n_threads=2) as pipe:
        r = pipe.generate("a boat", width=64, height=64, steps=1, seed=2)
    assert r.arrays[0].std() > 1.0

    with pytest.raises(sdcpp_py.ModelLoadError, match="no file matching"):
        download("z-image-turbo", quant="Q3_K", cache_dir=str(tmp_path), local_files_only=True)


def test_download_without_cache_fails_cleanly_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(sdcpp_py.ModelNotFoundError, match="leejet/FLUX.2-klein-4B-GGUF"):
        download("flux2-klein-4b", cache_dir=str(tmp_path), local_files_only=True)
