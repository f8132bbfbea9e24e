"""Stopping calls: cancel() from another thread, cancel tokens, Ctrl-C, a raising progress
callback. A stop inside a graph is told apart from one between graphs by the engine's
count of graphs stopped midway; after every stop the pipeline makes the reference image."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from sdcpp_py import Cancelled, Pipeline
from sdcpp_py._ffi import lib

# Tiny Z-Image at 1024x1024: ~0.7 s per step on 2 cores, a step is one graph of ~100 nodes
BIG = dict(width=1024, height=1024)
SMALL = dict(width=128, height=128, steps=2, seed=7)


@pytest.fixture(scope="module")
def zpipe(pipelines):
    return pipelines["z-image-turbo"]


@pytest.fixture(scope="module")
def reference(zpipe):
    return np.asarray(zpipe.generate("a red door", **SMALL).image)


def _cancel_after(fn, seconds: float) -> threading.Thread:
    """Call ``fn`` once, ``seconds`` after the start; returns the thread (its .at is when)."""
    def run():
        time.sleep(seconds)
        run.at = time.perf_counter()
        fn()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.at = lambda: run.at
    return t


def _first_step_then(action, delay: float):
    """A progress callback that, at the first finished step, schedules ``action`` after ``delay``."""
    state = {"steps": [], "timer": None}

    def progress(step, steps, seconds):
        state["steps"].append(step)
        if step >= 1 and state["timer"] is None:
            state["timer"] = _cancel_after(action, delay)
    return progress, state


def test_cancel_from_another_thread_stops_mid_step(zpipe, reference):
    cond = zpipe.encode("a red door")
    aborted = lib.sdcpp_aborted_computes()
    progress, state = _first_step_then(zpipe.cancel, 0.3)   # ~0.3 s into the second step
    start = time.perf_counter()
    with pytest.raises(Cancelled):
        zpipe.denoise(cond, steps=8, seed=3, progress=progress, **BIG)
    returned = time.perf_counter()
    latency = returned - state["timer"].at()
    print(f"cancel -> return {latency * 1000:.0f} ms, after steps {state['steps']}, {returned - start:.2f} s in")
    assert lib.sdcpp_aborted_computes() == aborted + 1      # stopped inside the step's graph
    assert max(state["steps"]) < 3 and latency < 0.5
    assert np.array_equal(np.asarray(zpipe.generate("a red door", **SMALL).image), reference)


def test_cancel_stops_a_vae_decode_midway(zpipe, reference):
    latent = zpipe.denoise(zpipe.encode("a red door"), width=768, height=768, steps=1, seed=1)
    aborted = lib.sdcpp_aborted_computes()
    timer = _cancel_after(zpipe.cancel, 0.5)                # the decode takes ~2 s, one graph
    with pytest.raises(Cancelled):
        zpipe.decode(latent)
    latency = time.perf_counter() - timer.at()
    print(f"decode: cancel -> return {latency * 1000:.0f} ms")
    assert lib.sdcpp_aborted_computes() == aborted + 1 and latency < 0.5
    assert np.array_equal(np.asarray(zpipe.generate("a red door", **SMALL).image), reference)


def test_cancel_token_stops_one_call_and_not_the_next(zpipe, reference):
    token = threading.Event()
    progress, state = _first_step_then(token.set, 0.2)
    with pytest.raises(Cancelled):
        zpipe.generate("a red door", steps=8, seed=3, progress=progress, cancel=token, **BIG)
    assert max(state["steps"]) < 3
    already = threading.Event()
    already.set()
    with pytest.raises(Cancelled):                          # set before the call: nothing runs
        zpipe.generate("a red door", cancel=already, **SMALL)
    assert np.array_equal(np.asarray(zpipe.generate("a red door", cancel=threading.Event(), **SMALL).image),
                          reference)


def test_cancel_with_nothing_running_does_not_touch_later_calls(zpipe, reference):
    zpipe.cancel()
    assert np.array_equal(np.asarray(zpipe.generate("a red door", **SMALL).image), reference)


def test_cancel_stops_only_its_own_pipeline(tiny_sets, zpipe, reference):
    m = tiny_sets["flux2-klein"]
    with Pipeline(diffusion_model=m.diffusion_model, llm=m.llm, vae=m.vae, n_threads=2) as other:
        progress, state = _first_step_then(other.cancel, 0.0)   # cancels a pipeline that is not running
        result = zpipe.generate("a red door", progress=progress, **SMALL)
        assert np.array_equal(np.asarray(result.image), reference)


def test_ctrl_c_stops_a_generation_mid_step(zpipe, reference, sigint_raises):
    """A real SIGINT to this process while the main thread waits for a generation."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    aborted = lib.sdcpp_aborted_computes()
    progress, state = _first_step_then(lambda: os.kill(os.getpid(), signal.SIGINT), 0.3)
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        zpipe.generate("a red door", steps=8, seed=3, progress=progress, **BIG)
    latency = time.perf_counter() - state["timer"].at()
    print(f"SIGINT -> KeyboardInterrupt {latency * 1000:.0f} ms, after steps {state['steps']}, "
          f"{time.perf_counter() - start:.2f} s in")
    assert lib.sdcpp_aborted_computes() == aborted + 1 and latency < 0.5 and max(state["steps"]) < 3
    assert np.array_equal(np.asarray(zpipe.generate("a red door", **SMALL).image), reference)


def test_a_raising_progress_callback_stops_the_call(zpipe, reference):
    seen = []

    def progress(step, steps, seconds):
        seen.append(step)
        if step == 1:
            raise RuntimeError("stop here")
    with pytest.raises(RuntimeError, match="stop here"):
        zpipe.generate("a red door", steps=6, seed=3, progress=progress, **BIG)
    assert seen == [0, 1] or seen == [1]
    assert np.array_equal(np.asarray(zpipe.generate("a red door", **SMALL).image), reference)


def test_close_from_another_thread_waits_for_the_running_call(tiny_sets):
    m = tiny_sets["z-image-turbo"]
    pipe = Pipeline(diffusion_model=m.diffusion_model, llm=m.llm, vae=m.vae, n_threads=2)
    ref = pipe.generate("a red door", **SMALL)
    closer = {}

    def progress(step, steps, seconds):
        if step == 1 and not closer:
            closer["t"] = threading.Thread(target=pipe.close)
            closer["t"].start()
    result = pipe.generate("a red door", progress=progress, **SMALL)
    closer["t"].join(30)
    assert pipe.closed and np.array_equal(np.asarray(result.image), np.asarray(ref.image))


@pytest.mark.parametrize("token", [True, "stop", 1])
def test_a_bad_cancel_token_raises_and_the_engine_lives(zpipe, reference, token):
    with pytest.raises(TypeError, match="threading.Event"):
        zpipe.generate("a red door", cancel=token, **SMALL)

    class Broken:
        def is_set(self):
            raise RuntimeError("broken token")
    with pytest.raises(RuntimeError, match="broken token"):
        zpipe.generate("a red door", cancel=Broken(), **SMALL)
    assert np.array_equal(np.asarray(zpipe.generate("a red door", **SMALL).image), reference)
