"""CPU variants chosen at run time, device selection, clear errors."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import sdcpp_py
from sdcpp_py import backends
from sdcpp_py.backends import X86_VARIANTS, BackendError

# /proc/cpuinfo flag -> ggml feature name
_FLAGS = {"sse4_2": "SSE42", "avx": "AVX", "f16c": "F16C", "fma": "FMA", "avx2": "AVX2", "bmi2": "BMI2",
          "avx512f": "AVX512", "avx512vbmi": "AVX512_VBMI", "avx512_vnni": "AVX512_VNNI",
          "avx512_bf16": "AVX512_BF16", "avx_vnni": "AVX_VNNI", "amx_tile": "AMX_TILE", "amx_int8": "AMX_INT8"}


def _host_features():
    text = Path("/proc/cpuinfo").read_text()
    flags = set(re.search(r"^flags\s*:\s*(.*)$", text, re.M).group(1).split())
    return {v for k, v in _FLAGS.items() if k in flags}


def _run(code, **env):
    # cwd elsewhere: "python -c" puts the cwd first on sys.path, and the source tree has no library
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                          env={**os.environ, **env}, cwd=Path(__file__).parent)


def test_best_installed_variant_for_this_host():
    installed = backends.available_cpu_variants()
    variant = sdcpp_py.system_info()["cpu_variant"]
    if not installed:
        assert variant == "builtin"
        pytest.skip("static build: one CPU backend compiled in")
    host = _host_features()
    runnable = [v for v in installed if set(X86_VARIANTS[v]) <= host]
    assert variant == max(runnable, key=lambda v: len(X86_VARIANTS[v]))
    features = sdcpp_py.system_info()["cpu_features"]
    for need in backends.reported_features(variant):
        assert features.get(need), need


def test_devices_list_the_cpu():
    names = [d.name for d in backends.devices()]
    assert "CPU" in names
    cpu = [d for d in backends.devices() if d.name == "CPU"][0]
    assert cpu.type == "cpu"


def test_forced_variant_runs_and_stays_close(tiny):
    installed = backends.available_cpu_variants()
    if "x64" not in installed:
        pytest.skip("no x64 module")
    code = f"""
import json, numpy as np, sdcpp_py
from sdcpp_py import Pipeline
info = sdcpp_py.system_info()
p = Pipeline(diffusion_model={str(tiny.diffusion_model)!r}, llm={str(tiny.llm)!r}, vae={str(tiny.vae)!r}, n_threads=2)
a = p.generate("a boat", width=64, height=64, steps=2, seed=3).arrays[0]
np.save({str(tiny.diffusion_model.parent / "x64.npy")!r}, a)
print(json.dumps({{"variant": info["cpu_variant"], "avx2": info["cpu_features"].get("AVX2", False)}}))
"""
    run = _run(code, SDCPP_PY_CPU_VARIANT="x64")
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out == {"variant": "x64", "avx2": False}
    baseline = np.load(tiny.diffusion_model.parent / "x64.npy").astype(int)
    with sdcpp_py.Pipeline(diffusion_model=tiny.diffusion_model, llm=tiny.llm, vae=tiny.vae, n_threads=2) as p:
        best = p.generate("a boat", width=64, height=64, steps=2, seed=3).arrays[0].astype(int)
    assert np.abs(baseline - best).mean() < 2.0   # other kernels, same model: close, not bit-exact


def test_unknown_variant_is_a_clear_error():
    if not backends.available_cpu_variants():
        pytest.skip("static build")
    run = _run("import sdcpp_py; sdcpp_py.system_info()", SDCPP_PY_CPU_VARIANT="pentium4")
    assert run.returncode != 0
    assert "BackendError" in run.stderr and "no 'pentium4' CPU module" in run.stderr


def test_backend_choice(tiny):
    with sdcpp_py.Pipeline(diffusion_model=tiny.diffusion_model, llm=tiny.llm, vae=tiny.vae,
                           backend="cpu") as p:
        assert p.device == "CPU"
    with pytest.raises(sdcpp_py.InvalidArgumentError, match="backend"):
        sdcpp_py.ContextSettings(backend="cuda")
    if not any(d.name.startswith("Vulkan") for d in backends.devices()):
        with pytest.raises(BackendError, match="no Vulkan device"):
            sdcpp_py.Pipeline(diffusion_model=tiny.diffusion_model, llm=tiny.llm, vae=tiny.vae, backend="vulkan")
    with pytest.raises(BackendError, match="no device"):
        sdcpp_py.Pipeline(diffusion_model=tiny.diffusion_model, llm=tiny.llm, vae=tiny.vae, device="Metal7")


VULKAN_CODE = """
import json, sys, numpy as np, sdcpp_py
from sdcpp_py import Pipeline, backends
names = [d.name for d in backends.devices()]
if not any(n.startswith("Vulkan") for n in names):
    print(json.dumps({"devices": names})); sys.exit(0)
files = dict(diffusion_model=sys.argv[1], llm=sys.argv[2], vae=sys.argv[3])
out = {"devices": names}
for backend in ("vulkan", "cpu"):
    with Pipeline(**files, backend=backend, n_threads=2) as p:
        out[backend] = p.generate("a red fox", width=64, height=64, steps=2, seed=5).arrays[0].tolist()
        out[backend + "_device"] = p.device
print(json.dumps(out))
"""


def _on_vulkan(code: str, *args: object) -> dict:
    """``code`` in a child (Vulkan's first device visible) and its JSON line; a skip without a
    Vulkan device, a failure where SDCPP_PY_REQUIRE_VULKAN=1."""
    run = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                         timeout=1500, cwd=Path(__file__).parent,
                         env={**os.environ, "GGML_VK_VISIBLE_DEVICES": os.environ.get("GGML_VK_VISIBLE_DEVICES", "0")})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    if "vulkan" not in out:
        if os.environ.get("SDCPP_PY_REQUIRE_VULKAN") == "1":
            pytest.fail(f"a Vulkan device is required (SDCPP_PY_REQUIRE_VULKAN=1); devices: {out['devices']}")
        pytest.skip(f"no Vulkan device ({out['devices']})")
    return out


@pytest.mark.vulkan
def test_vulkan_matches_cpu(tiny_sets):
    m = tiny_sets["flux2-klein"]
    out = _on_vulkan(VULKAN_CODE, m.diffusion_model, m.llm, m.vae)
    vk, cpu = np.array(out["vulkan"], dtype=int), np.array(out["cpu"], dtype=int)
    assert out["vulkan_device"].startswith("Vulkan") and out["cpu_device"] == "CPU"
    assert vk.shape == cpu.shape == (64, 64, 3) and vk.std() > 1
    diff = np.abs(vk - cpu)
    assert diff.mean() < 2.0 and diff.max() <= 24, (diff.mean(), diff.max())


VULKAN_CONTROLNET_CODE = """
import json, sys, numpy as np
from PIL import Image
from sdcpp_py import Pipeline, backends
names = [d.name for d in backends.devices()]
if not any(n.startswith("Vulkan") for n in names):
    print(json.dumps({"devices": names})); sys.exit(0)
files = dict(diffusion_model=sys.argv[1], llm=sys.argv[2], vae=sys.argv[3], controlnet=sys.argv[4])
edges = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) > 0.9).astype(np.uint8) * 255)
out = {"devices": names}
for backend in ("vulkan", "cpu"):
    with Pipeline(**files, backend=backend, n_threads=2) as p:
        plain = p.generate("a red fox", width=64, height=64, steps=2, seed=5).arrays[0]
        guided = p.generate("a red fox", control_image=edges, steps=2, seed=5, control_strength=1.0).arrays[0]
        out[backend] = {"plain": plain.tolist(), "guided": guided.tolist(), "device": p.device,
                        "variant": p.controlnet_loaded.get("variant")}
print(json.dumps(out))
"""


@pytest.mark.vulkan
def test_vulkan_runs_the_z_image_controlnet(tiny_sets, model_dir):
    """The ControlNet's blocks in the DiT's graph on a Vulkan device: the same guidance as on the CPU."""
    from sdcpp_py.synthetic import write_controlnet

    m = tiny_sets["z-image-turbo"]
    net = write_controlnet(model_dir, "2.1", seed=3)
    out = _on_vulkan(VULKAN_CONTROLNET_CODE, m.diffusion_model, m.llm, m.vae, net)
    vk, cpu = out["vulkan"], out["cpu"]
    assert vk["device"].startswith("Vulkan") and vk["variant"] == cpu["variant"] == "2.1"
    a = {k: np.array(v[k], dtype=int) for v, k in ((vk, "plain"), (vk, "guided"))}
    b = {k: np.array(v[k], dtype=int) for v, k in ((cpu, "plain"), (cpu, "guided"))}
    effect_vk, effect_cpu = np.abs(a["guided"] - a["plain"]).mean(), np.abs(b["guided"] - b["plain"]).mean()
    assert effect_cpu > 5 and abs(effect_vk - effect_cpu) < 0.1 * effect_cpu       # the same guidance
    diff = np.abs(a["guided"] - b["guided"])
    assert diff.mean() < 2.0 and diff.max() <= 24, (diff.mean(), diff.max())
