"""The weight policy: repacked kernels, expansion to BF16/F16, and what the engine does with it."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import sdcpp_py
from sdcpp_py import Pipeline
from sdcpp_py.backends import cpu_kernels
from sdcpp_py.modelfile import inspect
from sdcpp_py.synthetic import write_model_set
from sdcpp_py.weights import CpuKernels, growth, plan_weights

GIB = 1 << 30
ZEN4 = CpuKernels("zen4", frozenset({"AVX2", "AVX512", "AVX512_VNNI", "AVX512_BF16"}), ("CPU_REPACK",))
HASWELL = CpuKernels("haswell", frozenset({"AVX2", "FMA", "F16C"}), ("CPU_REPACK",))


@pytest.fixture(scope="module")
def q8(model_dir):
    return write_model_set("flux2-klein", model_dir, size="tiny", seed=2, dit_type="q8_0", llm_type="q8_0")


@pytest.fixture(scope="module")
def q4(model_dir):
    return {f: write_model_set(f, model_dir, size="tiny", seed=3, dit_type="q4_0", llm_type="q4_0")
            for f in ("z-image-turbo", "flux2-klein")}


def _paths(m):
    return {"diffusion_model": m.diffusion_model, "llm": m.llm, "vae": m.vae}


def test_growth_counts_only_quantized_matrices(q8, tiny_sets):
    g = growth(inspect(q8.diffusion_model))
    f = inspect(q8.diffusion_model)
    quantized = [t for t in f.tensors.values() if t.dtype == "Q8_0"]
    assert quantized and 0 < g.tensors <= len(quantized)
    # Q8_0 stores 34 bytes per 32 weights; F16 needs 64: the growth is 30/34 of the converted bytes
    assert g.extra_bytes > 0.5 * sum(int(np.prod(t.shape)) for t in quantized) * 30 / 32
    assert growth(inspect(tiny_sets["flux2-klein"].diffusion_model)).extra_bytes == 0   # F16 already


def test_policy_keeps_repackable_types_and_expands_the_rest(q8, q4, tiny_sets):
    q8p, q4p = _paths(q8), _paths(q4["flux2-klein"])
    # Q8_0 has no repacked x86 kernel: expanded, to BF16 where the CPU has it, F16 elsewhere
    wide = plan_weights("auto", q8p, on_cpu=True, wtype=None, kernels=ZEN4, memory=64 * GIB)
    assert wide.components == ("diffusion", "encoder") and wide.target == "bf16"
    assert wide.rules == (r"^model\.diffusion_model\.=bf16,"
                          r"^text_encoders\.(?!.*(embed_tokens|token_embd|token_embedding))=bf16")
    assert wide.per_component["diffusion"].memory_type == "BF16"
    assert plan_weights("auto", q8p, on_cpu=True, wtype=None, kernels=HASWELL, memory=64 * GIB).target == "f16"
    # measured per CPU module: on sapphirerapids Q8_0 as stored steps as fast as expanded
    spr = CpuKernels("sapphirerapids", ZEN4.features | {"AMX_INT8"}, ("AMX", "CPU_REPACK"))
    spr_plan = plan_weights("auto", q8p, on_cpu=True, wtype=None, kernels=spr, memory=64 * GIB)
    assert spr_plan.components == () and "measured" in spr_plan.reason
    # Q4_0 runs on the repacked kernels: kept as stored, in their layout
    kept = plan_weights("auto", q4p, on_cpu=True, wtype=None, kernels=ZEN4, memory=64 * GIB)
    assert kept.components == () and kept.rules == "" and kept.native_buffers == "CPU_REPACK"
    assert kept.per_component["diffusion"].kernel == "CPU_REPACK"
    assert kept.per_component["diffusion"].memory_type == "Q4_0"
    # ... unless repacking is off: then the plain Q4_0 path is the slow one, and it is expanded
    plain = plan_weights("auto", q4p, on_cpu=True, wtype=None, repack="none", kernels=ZEN4, memory=64 * GIB)
    assert plain.components == ("diffusion", "encoder") and plain.native_buffers == ""
    # a machine too small for the expansion keeps the file's type, and says why
    small = plan_weights("auto", q8p, on_cpu=True, wtype=None, kernels=ZEN4, memory=2 * GIB)
    assert small.components == () and "does not fit 2.0 GiB" in small.reason
    # forced and disabled
    assert plan_weights("none", q8p, on_cpu=True, wtype=None, kernels=ZEN4).rules == ""
    assert plan_weights("diffusion", q4p, on_cpu=True, wtype=None, kernels=ZEN4,
                        target="f16").rules == r"^model\.diffusion_model\.=f16"
    assert plan_weights("all", q8p, on_cpu=True, wtype="q4_0", kernels=ZEN4).components == ()   # wtype wins
    assert plan_weights("auto", q8p, on_cpu=False, wtype=None, kernels=ZEN4, memory=64 * GIB).components == ()
    f16 = plan_weights("auto", _paths(tiny_sets["flux2-klein"]), on_cpu=True, wtype=None, kernels=ZEN4,
                       memory=64 * GIB)
    assert f16.components == () and f16.per_component["diffusion"].memory_type == "F16"


def test_policy_depends_on_total_memory_not_free_memory(q8, monkeypatch):
    """Same files, settings and machine: the same plan, however much memory is free at load."""
    import sdcpp_py.weights as w
    plans = set()
    for free in (1 * GIB, 20 * GIB):
        monkeypatch.setattr(w, "available_memory", lambda free=free: free, raising=False)
        plans.add(w.plan_weights("auto", _paths(q8), on_cpu=True, wtype=None, kernels=ZEN4).rules)
    assert len(plans) == 1
    assert w.total_memory() > 0


def test_kernel_table_follows_the_cpu():
    assert ZEN4.kernel_for("Q2_K", "auto") == "CPU_REPACK"          # Q2_K repacks with AVX-512 only
    assert HASWELL.kernel_for("Q2_K", "auto") is None
    assert HASWELL.kernel_for("Q4_K", "auto") == "CPU_REPACK"
    for t in ("Q8_0", "Q5_K", "Q6_K", "Q5_0", "Q4_1", "F16"):
        assert ZEN4.kernel_for(t, "auto") is None, t
    assert ZEN4.kernel_for("Q4_0", "none") is None
    here = cpu_kernels()
    assert here.variant == sdcpp_py.system_info()["cpu_variant"]
    assert "CPU_REPACK" in here.buffers


@pytest.mark.parametrize("family", ["z-image-turbo", "flux2-klein"])
def test_repacked_weights_in_the_engine(q4, family):
    m = q4[family]
    with Pipeline(**_paths(m), n_threads=2, upcast="none", repack="none") as plain, \
            Pipeline(**_paths(m), n_threads=2, upcast="none", release_diffusion=True) as packed:
        a = plain.generate("a lighthouse", width=64, height=64, steps=2, seed=4)
        b = packed.generate("a lighthouse", width=64, height=64, steps=2, seed=4)
        assert "CPU_REPACK" not in a.weights["buffers"]["diffusion"]
        for component in ("diffusion", "encoder"):
            assert b.weights["buffers"][component]["CPU_REPACK"] > 0, b.weights
            # the repacked layout of Q4_0 takes the bytes of the stored one
            assert sum(b.weights["buffers"][component].values()) == sum(a.weights["buffers"][component].values())
        assert b.weights["per_component"]["diffusion"]["kernel"] == "CPU_REPACK"
        x, y = a.arrays[0].astype(int), b.arrays[0].astype(int)
        assert x.std() > 1 and np.abs(x - y).mean() < 1.0 and np.abs(x - y).max() <= 4   # float rounding
        # released and reloaded (release_diffusion): repacked again, the same pixels
        packed.release_diffusion_model()
        c = packed.encode("a lighthouse")
        again = packed.decode(packed.denoise(c, width=64, height=64, steps=2, seed=4), output_type="np")
        assert packed.weights["buffers"]["diffusion"]["CPU_REPACK"] > 0
        assert np.array_equal(again, b.arrays[0])


# one process per kernel choice: ggml reads GGML_CPU_VNNI_GEMM once
_INT8_RUN = """
import sys, numpy as np
from sdcpp_py import Pipeline
dit, llm, vae, out = sys.argv[1:5]
with Pipeline(diffusion_model=dit, llm=llm, vae=vae, n_threads=2) as p:
    c = p.encode("a lighthouse on a cliff at dusk, waves, gulls, long exposure, wet rocks, a red boat, "
                 "fog over the sea")
    img = p.decode(p.denoise(c, width=128, height=96, steps=2, seed=5), output_type="np")
    np.savez(out, context=c.context, image=img, repacked=p.weights["buffers"]["encoder"].get("CPU_REPACK", 0))
"""


@pytest.mark.parametrize(("family", "qtype"), [("z-image-turbo", "q4_k"), ("flux2-klein", "q4_k"),
                                               ("z-image-turbo", "q4_0"), ("flux2-klein", "iq4_nl")])
def test_int8_kernels_match_ggml_kernels(model_dir, tmp_path, family, qtype):
    """The repacked 4-bit matmuls' int8 VNNI GEMMs (vendor/patches/0018) against ggml's own, in
    the engine: the text encoding (Z-Image's 36 tokens: four 8-row blocks and a 4-row one;
    Klein's 512: two bands of rows) agrees to rounding, the image (Z-Image's DiT: image and text
    tokens padded to 32s) to a few levels (tiny random models amplify rounding), and the Q4_K
    GEMM's 256- and 512-bit forms give the same bits."""
    if "AVX512_VNNI" not in cpu_kernels().features:
        pytest.skip("the int8 GEMMs need the AVX-512 VNNI module")
    m = write_model_set(family, model_dir, size="tiny", seed=3, dit_type=qtype, llm_type=qtype)
    runs = {}
    for choice in ("0", "512", "256"):
        out = tmp_path / f"{choice}.npz"
        subprocess.run([sys.executable, "-c", _INT8_RUN, str(m.diffusion_model), str(m.llm), str(m.vae), str(out)],
                       check=True, env={**os.environ, "GGML_CPU_VNNI_GEMM": choice}, timeout=300,
                       cwd=tmp_path)   # not the checkout: its sdcpp_py has no library when the wheel is tested
        runs[choice] = np.load(out)
    ggml, wide, narrow = runs["0"], runs["512"], runs["256"]
    assert int(wide["repacked"]) > 0      # the encoder's Q4_K matrices are on the repacked kernels
    for key in ("context", "image"):
        assert np.array_equal(wide[key], narrow[key]), key
    ctx, ref = wide["context"], ggml["context"]
    assert ref.std() > 0.1 and np.abs(ctx - ref).max() < 0.05 * ref.std(), np.abs(ctx - ref).max()
    x, y = ggml["image"].astype(int), wide["image"].astype(int)
    assert x.std() > 1 and np.abs(x - y).mean() < 1.0 and np.abs(x - y).max() <= 4
    assert not np.array_equal(x, y) or not np.array_equal(ctx, ref)   # the int8 GEMMs ran


def test_expansion_reaches_the_engine_and_survives_reload(q8):
    kept = Pipeline(**_paths(q8), n_threads=2, upcast="none")
    wide = Pipeline(**_paths(q8), n_threads=2, upcast="all", release_diffusion=True)
    try:
        extra = {c: growth(inspect(p)).extra_bytes for c, p in (("diffusion", q8.diffusion_model), ("encoder", q8.llm))}
        before, after = kept.weight_bytes, wide.weight_bytes
        assert after["diffusion"] == 0 and not wide.diffusion_loaded   # deferred until needed
        grown = after["encoder"] - before["encoder"]
        assert abs(grown - extra["encoder"]) < 0.02 * extra["encoder"] + 65536, (grown, extra)
        a = kept.generate("a lighthouse", width=64, height=64, steps=2, seed=4).arrays[0].astype(int)
        r = wide.generate("a lighthouse", width=64, height=64, steps=2, seed=4)
        b = r.arrays[0].astype(int)
        assert r.weights["components"] == ["diffusion", "encoder"]
        assert r.weights["per_component"]["diffusion"]["memory_type"] == wide.weight_plan.target.upper()
        grown = wide.weight_bytes["diffusion"] - kept.weight_bytes["diffusion"]
        assert abs(grown - extra["diffusion"]) < 0.02 * extra["diffusion"] + 65536, (grown, extra)
        assert a.std() > 1 and np.abs(a - b).mean() < 3.0   # same weights, other kernels: close
    finally:
        kept.close()
        wide.close()


def test_bad_weight_policy_values():
    with pytest.raises(sdcpp_py.InvalidArgumentError, match="upcast"):
        sdcpp_py.ContextSettings(upcast="bf16")
    with pytest.raises(sdcpp_py.InvalidArgumentError, match="upcast_type"):
        sdcpp_py.ContextSettings(upcast_type="q8_0")
    with pytest.raises(sdcpp_py.InvalidArgumentError, match="repack"):
        sdcpp_py.ContextSettings(repack="amx")
    with pytest.raises(TypeError, match="tensor_type_rules"):
        sdcpp_py.ContextSettings(tensor_type_rules=["^model=f16"])
