"""The benchmark suite keeps working: its quick mode runs end to end on tiny models and
writes the JSON, the markdown, the plots and the contact sheets (no timing asserts)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdcpp_py._ffi import library_path
from sdcpp_py.system import sd_cli_path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_run_quick(tmp_path):
    if sd_cli_path() is None:
        if os.environ.get("SDCPP_PY_REQUIRE_CLI") == "1":
            pytest.fail("sd-cli is required (SDCPP_PY_REQUIRE_CLI=1) but was not built")
        pytest.skip("sd-cli not built")
    pytest.importorskip("matplotlib")
    out = tmp_path / "results"
    env = {**os.environ, "SDCPP_PY_BENCH_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, str(BENCH / "run.py"), "--quick", "--out", str(out),
                          "--knobs", "0,1,6,11", "--sweeps", "steps,seeds,quant,aspects",
                          # the load part's baseline: the same library by another path (what a
                          # previous build's copy would be)
                          "--baseline-library", str(library_path())],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert "AVX2" in data["machine"]["build_features"]

    for res in data["compare"]:
        names = [r["name"] for r in res["rows"]]
        assert names[:3] == ["sdcpp-py, defaults (1 process)", "sdcpp-py, sd-cli's settings (1 process)",
                             "sd-cli, package flags (N processes)"]
        assert res["rows"][2]["processes"] == 2 and res["rows"][0]["images"] == 2
        for item in res["rows"][0]["reports"][0]["items"]:   # every sampling step timed
            assert len(item["steps_s"]) == item["steps"] and all(t > 0 for t in item["steps_s"])
        assert res["ratios"]["a_sd_cli_package_flags_vs_ours_same_settings"] > 0
        assert res["ratios"]["b_overhead_in_process"] > 0
        # tools this cache lacks are named, not silently dropped
        assert "sd-cli upstream flags" in res["skipped"] and "stable-diffusion-cpp-python" in res["skipped"]

    knob = {r["label"]: r for r in data["knobs"][0]["rows"]}
    # the default keeps a Q4_0 DiT in the repacked kernels' layout; repack=none keeps it plain
    assert knob["defaults (Q4_0 file)"]["weights"]["buffers"]["diffusion"].get("CPU_REPACK", 0) > 0
    plain = knob["Q4_0 as stored, plain kernels (repack=none, upcast=none)"]
    assert "CPU_REPACK" not in plain["weights"]["buffers"]["diffusion"] and not plain["upcast"]
    assert knob["defaults + release encoder/diffusion"]["peak_rss_mb"] > 0

    vae = {(r["family"], r["config"]): r for r in data["vae"]["rows"]}   # each VAE setting in its own process
    assert set(vae) == {(f, c) for f in ("z-image-turbo", "flux2-klein") for c in ("f16", "bf16")}
    assert all(r["size"] == 64 and r["decode_s"] > 0 and r["peak_rss_mb"] > 0 for r in vae.values())

    kern = data["kernels"]   # each configuration in its own process, both families, goals derived
    by = {(r["family"], r["key"]): r for r in kern["rows"]}
    assert {f for f, _ in by} == {"z-image-turbo", "flux2-klein"}
    for family in ("z-image-turbo", "flux2-klein"):
        assert by[(family, "q4_0")]["plan"]["diffusion"]["kernel"] == "CPU_REPACK"
        assert by[(family, "q4_0")]["buffers_mb"]["diffusion"].get("CPU_REPACK", 0) > 0
        assert by[(family, "q4_0-plain")]["plan"]["diffusion"]["kernel"] == "plain"
        assert by[(family, "bf16")]["plan"]["diffusion"]["memory_type"] == "BF16"
        assert all(by[(family, k)]["step_s"] > 0 and by[(family, k)]["peak_rss_mb"] > 0
                   for k in ("q4_0", "q4_0-plain", "q4_k", "bf16"))
    # the tiny Z-Image layout has Linears wide enough for 256-element K blocks: they are repacked
    assert by[("z-image-turbo", "q4_k")]["plan"]["diffusion"] == {"file_type": "Q4_K", "memory_type": "Q4_K",
                                                                "kernel": "CPU_REPACK"}
    goals = {(g["family"], g["goal"]) for g in kern["goals"]}
    assert ("flux2-klein", "q4_0 repacked s/step vs best expanded (bf16)") in goals
    assert all(isinstance(g["met"], bool) and g["ratio"] == g["ratio"] for g in kern["goals"])   # no NaN
    loads = {(r["family"], r["key"], r["library"]): r for r in kern["loads"]}
    assert set(loads) == {(f, k, lib) for f in ("z-image-turbo", "flux2-klein") for k in ("q4_k", "bf16")
                          for lib in ("installed", "baseline")}
    for r in loads.values():   # the loader's own split was read from its log
        assert r["load_s"] > 0 and r["peak_rss_mb"] > 0 and set(r["load_split"]) >= {"read_s", "convert_s"}
        assert 0 < r["load_split"]["tensors_s"] <= r["load_s"] + 0.05
    assert loads[("z-image-turbo", "bf16", "baseline")]["plan"]["diffusion"]["memory_type"] == "BF16"
    for p in kern["profiles"]:   # perf around the denoising call only, samples grouped by kernel
        if "skipped" in p:
            assert "perf" in p["skipped"]
            continue
        assert p["categories"] and abs(sum(c["percent"] for c in p["categories"]) - 100) < 1.0
    assert "## Kernels" in (out / "summary.md").read_text()

    for r in data["roofline"]:
        assert r["step_gflop"] > 0 and r["peak_gflops_fp32_gemm"] > 0 and 0 < r["fraction_of_peak"]

    for res in data["guide"]:
        sweeps = res["sweeps"]
        assert [r["steps"] for r in sweeps["steps"]["rows"]] == [1, 3]
        assert len(sweeps["seeds"]["rows"]) == 4   # 2 seeds x landscape and portrait
        assert {(r["width"] > r["height"]) for r in sweeps["seeds"]["rows"]} == {True, False}
        quant = sweeps["quant"]["rows"]
        assert [r["label"] for r in quant][:3] == ["f16", "q8_0", "q4_0"]
        assert quant[0]["mean_abs_diff"] == 0 and quant[0]["max_abs_diff"] == 0
        assert all(r["dit_bytes"] > 0 and r["mean_abs_diff"] >= 0 for r in quant)
        # fewer bits, smaller weights: the 2-bit DiT is smaller than the F16 one
        assert quant[-1]["label"] == "q2_K" and quant[-1]["dit_bytes"] < quant[0]["dit_bytes"]
        assert len(sweeps["aspects"]["rows"]) == 11
        assert all(r["width"] % 16 == 0 and r["height"] % 16 == 0 for r in sweeps["aspects"]["rows"])
        for sweep in sweeps.values():
            assert Path(sweep["sheet"]).stat().st_size > 1000

    assert all(Path(p).is_file() for p in data["plots"]) and len(data["plots"]) >= 6
    summary = (out / "summary.md").read_text()
    assert "## Comparisons" in summary and "## Roofline" in summary and "## Field-guide sweeps" in summary

    for res in data["control"]:   # cancel stops inside the graph; isolation keeps the pixels
        rows = res["cancel_step"] + res["cancel_decode"]
        assert rows and all(r["outcome"] == "cancelled" and r["stopped_midway"] for r in rows)
        assert res["isolated_same_pixels"] and res["isolation_overhead"] > 0
        assert res["rss_after_close_mb"] < res["rss_after_generations_mb"]
    assert "## Control" in summary
    for res in data["server"]:    # the HTTP path runs and is measured against the in-process one
        assert res["http_overhead"] > 0 and res["requests_per_minute_4_clients"] > 0
        assert res["latency_p95_s"] >= res["latency_p50_s"] > 0
    assert "## Server" in summary
    for res in data["sweep"]:     # in one process and on Ray: the same files, Ray's overhead measured
        if "skipped" in res:
            assert "Ray" in res["skipped"]
            continue
        assert [p["path"] for p in res["paths"]] == ["in-process, 1 thread", "in-process, 2 threads",
                                                     "Ray, 1 actor x 1 CPU", "Ray, 2 actors x 1 CPU"]
        assert all(res["equal_to_in_process"].values()) and res["rows"] == 16
        assert all(p["images_per_minute"] > 0 and p["busiest_worker_s"] > 0 for p in res["paths"])
    assert "## Sweeps" in summary
    for res in data["parity"]:    # LoRAs in both apply modes, every DiT step cache, in one process each
        lora = [(r["apply"], r["label"]) for r in res["rows"] if r["part"] == "lora"]
        for apply in ("runtime", "runtime-bf16", "merged"):    # on the file's weights, expanded, merged
            assert [label for mode, label in lora if mode == apply] == [label for _, label in lora[:6]]
        assert {mode for mode, _ in lora} == {"runtime", "runtime-bf16", "merged"}
        assert all("diffusion" in r["expanded"] for r in res["rows"] if r.get("apply") == "runtime-bf16")
        cache = {r["label"]: r for r in res["rows"] if r["part"] == "cache"}
        assert set(cache) == {"none", "easycache", "dbcache", "taylorseer", "cache-dit", "spectrum"}
        assert cache["none"]["skipped"] == 0 and any(r["skipped"] > 0 for r in cache.values())
        assert all(r["denoise_s"] > 0 and r["denoise_vs_none"] > 0 for r in res["rows"])
        if res["family"] == "z-image-turbo":   # the ControlNet: without and with, on Q4_K and BF16 weights
            control = res["controlnet"]
            assert {(r["weights"], r["controlnet"]) for r in control} == {(w, c) for w in ("q4_k", "bf16")
                                                                          for c in (False, True)}
            assert all(r["step_s"] > 0 and r["step_vs_plain"] > 0 for r in control)
            assert all(r["controlnet_mb"] > 0 for r in control if r["controlnet"])
    assert data["upscale"]["output"] == "256x256" and data["upscale"]["peak_rss_mb"] > 0
    assert "## Engine parity" in summary
