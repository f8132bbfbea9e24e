"""Quantized weights expanded to F16 at load time: the plan, and what the engine does with it."""

from __future__ import annotations

import numpy as np
import pytest

import sdcpp_py
from sdcpp_py import Pipeline
from sdcpp_py.modelfile import inspect
from sdcpp_py.synthetic import write_model_set
from sdcpp_py.weights import growth, plan_upcast

GIB = 1 << 30


@pytest.fixture(scope="module")
def q8(model_dir):
    return write_model_set("flux2-klein", model_dir, size="tiny", seed=2, dit_type="q8_0", llm_type="q8_0")


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


def test_plan_follows_policy_memory_and_backend(q8, tiny_sets):
    paths = _paths(q8)
    assert plan_upcast("none", paths, on_cpu=True, wtype=None).rules == ""
    both = plan_upcast("all", paths, on_cpu=True, wtype=None)
    assert both.components == ("diffusion", "encoder")
    assert both.rules == r"^model\.diffusion_model\.=f16,^text_encoders\.=f16"
    assert plan_upcast("diffusion", paths, on_cpu=True, wtype=None).components == ("diffusion",)
    assert plan_upcast("auto", paths, on_cpu=True, wtype=None, available=64 * GIB).components == both.components
    starved = plan_upcast("auto", paths, on_cpu=True, wtype=None, available=2 * GIB)
    assert starved.components == () and "2.0 GiB available" in starved.reason
    assert plan_upcast("auto", paths, on_cpu=False, wtype=None, available=64 * GIB).components == ()
    assert plan_upcast("all", paths, on_cpu=True, wtype="q4_0").components == ()   # wtype wins
    f16 = plan_upcast("auto", _paths(tiny_sets["flux2-klein"]), on_cpu=True, wtype=None, available=64 * GIB)
    assert f16.components == () and "no quantized" in f16.reason


def test_upcast_reaches_the_engine_and_survives_reload(q8):
    kept = Pipeline(**_paths(q8), n_threads=2, upcast="none")
    wide = Pipeline(**_paths(q8), n_threads=2, upcast="all", release_diffusion=True)
    try:
        extra = {c: growth(inspect(p)).extra_bytes for c, p in (("diffusion", q8.diffusion_model), ("encoder", q8.llm))}
        before, after = kept.weight_bytes, wide.weight_bytes
        assert after["diffusion"] == 0 and not wide.diffusion_loaded   # deferred until needed
        grown = after["encoder"] - before["encoder"]
        assert abs(grown - extra["encoder"]) < 0.02 * extra["encoder"] + 65536, (grown, extra)
        a = kept.generate("a lighthouse", width=64, height=64, steps=2, seed=4).arrays[0].astype(int)
        b = wide.generate("a lighthouse", width=64, height=64, steps=2, seed=4).arrays[0].astype(int)
        grown = wide.weight_bytes["diffusion"] - kept.weight_bytes["diffusion"]
        assert abs(grown - extra["diffusion"]) < 0.02 * extra["diffusion"] + 65536, (grown, extra)
        assert a.std() > 1 and np.abs(a - b).mean() < 3.0   # same weights, other kernels: close
    finally:
        kept.close()
        wide.close()


def test_bad_upcast_values():
    with pytest.raises(sdcpp_py.InvalidArgumentError, match="upcast"):
        sdcpp_py.ContextSettings(upcast="bf16")
    with pytest.raises(TypeError, match="tensor_type_rules"):
        sdcpp_py.ContextSettings(tensor_type_rules=["^model=f16"])
