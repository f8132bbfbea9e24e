"""Inputs the engine would abort on are refused in Python; the pipeline stays usable after each."""

import dataclasses
import logging
import os
import re

import numpy as np
import pytest
from PIL import Image

from sdcpp_py import (
    Conditioning,
    ContextSettings,
    IncompatibleModelError,
    InvalidArgumentError,
    ModelLoadError,
    Pipeline,
    ReentrantCallError,
    SdcppError,
)
from sdcpp_py.synthetic import component_specs
from sdcpp_py.synthetic.writer import plan_tensors, write_file

PROMPT = "a windmill in a tulip field"
SMALL = dict(width=64, height=64, steps=1, seed=4)


def _still_works(pipe):
    assert pipe.generate(PROMPT, **SMALL).image.size == (64, 64)


@pytest.mark.parametrize("wtype", ["i32", "deprecated", "q8_1", "q8_K", "iq2_xxs", "f64"])
def test_weight_types_the_engine_cannot_convert_to(wtype):
    with pytest.raises(InvalidArgumentError, match="weight type"):
        ContextSettings(wtype=wtype)


@pytest.mark.parametrize("rules, match", [
    (r"^model\.diffusion_model\.=i32", "weight type"),
    (r"^model\.diffusion_model\.=q8_K", "weight type"),
    (r"([unclosed=f16", "regular expression"),
    ("f16", "regex=type"),
])
def test_bad_tensor_type_rules(rules, match):
    with pytest.raises(InvalidArgumentError, match=re.escape(match) if "=" in match else match):
        ContextSettings(tensor_type_rules=rules)


def test_tensor_type_rules_are_normalised():
    s = ContextSettings(tensor_type_rules=r" ^model\.diffusion_model\.=Q4_k , ^text_encoders\.=F16 ")
    assert s.tensor_type_rules == r"^model\.diffusion_model\.=q4_K,^text_encoders\.=f16"


@pytest.mark.parametrize("kw, match", [
    (dict(scheduler="gits", steps=1), "at least 2 steps"),
    (dict(scheduler="karras", steps=1), "at least 2 steps"),
    (dict(scheduler="exponential", steps=1), "at least 2 steps"),
    (dict(scheduler="ays", steps=4), "ays"),
])
def test_schedules_that_would_crash_or_give_nan(pipe, kw, match):
    args = {**SMALL, **kw}
    with pytest.raises(InvalidArgumentError, match=match):
        pipe.generate(PROMPT, **args)
    with pytest.raises(InvalidArgumentError, match=match):
        pipe.denoise(pipe.encode(PROMPT), **args)
    _still_works(pipe)


def test_two_step_schedules_run(pipe):
    for scheduler in ("gits", "karras", "exponential"):
        a = pipe.generate(PROMPT, **{**SMALL, "steps": 2, "scheduler": scheduler}).arrays[0]
        assert a.std() > 0


def test_reference_images_must_be_multiples_of_16(pipelines):
    klein = pipelines["flux2-klein"]
    odd = Image.new("RGB", (40, 24), (200, 30, 30))
    with pytest.raises(InvalidArgumentError, match="multiples of 16"):
        klein.generate(PROMPT, **SMALL, ref_images=[odd])
    with pytest.raises(InvalidArgumentError, match="multiples of 16"):
        klein.denoise(klein.encode(PROMPT), **SMALL, ref_images=[odd])
    fine = Image.new("RGB", (48, 32), (200, 30, 30))
    edited = klein.generate(PROMPT, **SMALL, ref_images=[fine]).arrays[0]
    assert not np.array_equal(edited, klein.generate(PROMPT, **SMALL).arrays[0])


def _with_parts(cond, parts):
    return dataclasses.replace(cond, parts=parts)


def test_conditionings_of_the_wrong_shape(pipe):
    cond = pipe.encode(PROMPT, negative_prompt="")
    ctx = cond.context
    bad = {
        "negative width": ({**cond.parts, (1, "c_crossattn", 0): ctx[..., :-1]}, IncompatibleModelError, "width"),
        "batch of two": ({(0, "c_crossattn", 0): np.stack([ctx.reshape(ctx.shape[-2:])] * 2)},
                         InvalidArgumentError, "shape"),
        "rank 4": ({(0, "c_crossattn", 0): ctx.reshape((1, 1) + ctx.shape[-2:])}, InvalidArgumentError, "shape"),
        "unknown part": ({**cond.parts, (0, "c_vector", 0): np.zeros(8, np.float32)}, InvalidArgumentError,
                         "not one"),
        "no positive": ({(1, "c_crossattn", 0): ctx}, InvalidArgumentError, "no positive"),
        "integer data": ({(0, "c_crossattn", 0): ctx.astype(np.int32)}, InvalidArgumentError, "float"),
        "bad role": ({**cond.parts, (2, "c_crossattn", 0): ctx}, InvalidArgumentError, "role"),
    }
    for name, (parts, exc, match) in bad.items():
        with pytest.raises(exc, match=match):
            pipe.denoise(_with_parts(cond, parts), **SMALL, cfg_scale=2.0 if "negative" in name else 1.0)
    ok = pipe.denoise(cond, **SMALL)
    assert ok.data.shape[0] == 1 and np.isfinite(ok.data).all()


def test_saved_conditioning_that_is_not_one(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(SdcppError, match="not a saved Conditioning"):
        Conditioning.load(junk)
    other = tmp_path / "other.npz"
    np.savez(other, a=np.zeros(3))
    with pytest.raises(SdcppError, match="not a saved Conditioning"):
        Conditioning.load(other)
    with pytest.raises(FileNotFoundError):
        Conditioning.load(tmp_path / "missing.npz")


def test_progress_callback_cannot_reenter_or_close(pipe):
    cond = pipe.encode(PROMPT)
    for action in (lambda: pipe.close(), lambda: pipe.encode("inside", use_cache=False),
                   lambda: pipe.release_diffusion_model(), lambda: pipe.encoder_loaded):
        def callback(step, steps, seconds, action=action):
            action()

        with pytest.raises(ReentrantCallError, match="progress callback"):
            pipe.denoise(cond, **SMALL, progress=callback)
        with pytest.raises(ReentrantCallError):
            pipe.generate(PROMPT, **SMALL, progress=callback)
    assert not pipe.closed and pipe.diffusion_loaded
    assert pipe.engine.count_tokens("a refused close keeps the tokenizer") == 6
    _still_works(pipe)


def test_text_encoder_with_too_small_a_vocabulary(tiny, tmp_path):
    specs = component_specs("flux2-klein", "llm")
    specs = [dataclasses.replace(s, shape=(1000,) + s.shape[1:]) if s.name == "token_embd.weight" else s
             for s in specs]
    small = tmp_path / "small-vocab.gguf"
    write_file(small, plan_tensors(specs, "f16"), seed=1, metadata={"general.architecture": "qwen3"}, fmt="gguf")
    with pytest.raises(IncompatibleModelError, match="vocabulary of 1000"):
        Pipeline(diffusion_model=tiny.diffusion_model, llm=small, vae=tiny.vae)


def test_reload_refuses_a_replaced_file(tiny, tmp_path):
    llm = tmp_path / "llm.gguf"
    original = tiny.llm.read_bytes()
    llm.write_bytes(original)
    stamp = llm.stat().st_mtime_ns
    with Pipeline(diffusion_model=tiny.diffusion_model, llm=llm, vae=tiny.vae, n_threads=2) as p:
        p.release_encoder()
        llm.write_bytes(original + b"\0" * 64)
        with pytest.raises(ModelLoadError, match="changed since"):
            p.encode("after the swap", use_cache=False)
        llm.write_bytes(original)                  # the same file again: reloading works
        os.utime(llm, ns=(stamp, stamp))
        assert p.encode("after the swap", use_cache=False).context.shape[-1] > 0
        assert p.encoder_loaded


def test_generate_with_both_releases_never_holds_both(tiny, pipelines, family, caplog):
    """generate() itself, not only the staged calls, keeps one large model in memory at a time:
    follow the engine's own log of what it frees and loads."""
    ref = pipelines[family]
    kw = dict(width=64, height=48, steps=2, seed=21)
    with Pipeline(diffusion_model=tiny.diffusion_model, llm=tiny.llm, vae=tiny.vae, n_threads=2,
                  release_encoder=True, release_diffusion=True) as p:
        loaded = {"text encoder": p.encoder_loaded, "diffusion model": p.diffusion_loaded}
        with caplog.at_level(logging.INFO, logger="sdcpp_py.native"):
            caplog.clear()
            images = [p.generate(PROMPT, **kw).arrays[0], p.generate(PROMPT + " again", **kw).arrays[0]]
        working = 0
        for rec in caplog.records:
            msg = rec.getMessage()
            for name in loaded:
                if msg.startswith(f"{name} released"):
                    loaded[name] = False
                elif msg.startswith(f"{name} reloaded"):
                    loaded[name] = True
            if "get_learned_condition completed" in msg or "sampling completed" in msg:
                working += 1
                assert not all(loaded.values()), f"both models resident at: {msg}"
        assert working == 4
        assert np.array_equal(images[0], ref.generate(PROMPT, **kw).arrays[0])
