"""Pipeline(isolate=True): the engine in a worker process, same pixels, survives an abort."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from sdcpp_py import Cancelled, EngineCrashed, InvalidArgumentError, Pipeline

GEN = dict(width=128, height=128, steps=2, seed=11)


@pytest.fixture(scope="module")
def isolated(tiny_sets):
    m = tiny_sets["z-image-turbo"]
    p = Pipeline(diffusion_model=m.diffusion_model, llm=m.llm, vae=m.vae, n_threads=2, isolate=True)
    yield p
    p.close()


@pytest.fixture(scope="module")
def reference(pipelines):
    return np.asarray(pipelines["z-image-turbo"].generate("a quiet harbour", **GEN).image)


def test_isolated_pipeline_makes_the_in_process_pixels(isolated, pipelines, reference):
    assert isinstance(isolated, Pipeline) and isolated.family == "z-image"
    assert isolated.engine.pid not in (None, os.getpid())
    steps = []
    result = isolated.generate("a quiet harbour", progress=lambda s, n, t: steps.append(s), **GEN)
    assert np.array_equal(np.asarray(result.image), reference) and steps[-1] == 2
    cond = isolated.encode("a quiet harbour")
    local = pipelines["z-image-turbo"].encode("a quiet harbour")
    assert np.array_equal(cond.context, local.context)
    latent = isolated.denoise(cond, **GEN)
    assert np.array_equal(np.asarray(isolated.decode(latent)), reference)
    assert isolated.weight_bytes == pipelines["z-image-turbo"].weight_bytes
    assert isolated.weights["buffers"] == pipelines["z-image-turbo"].weights["buffers"]


def test_bad_input_raises_in_the_parent_and_the_worker_stays(isolated, reference):
    pid = isolated.engine.pid
    with pytest.raises(InvalidArgumentError):
        isolated.generate("a quiet harbour", width=100, height=128, steps=2)
    assert isolated.engine.pid == pid
    assert np.array_equal(np.asarray(isolated.generate("a quiet harbour", **GEN).image), reference)


def test_an_engine_abort_raises_engine_crashed_and_the_next_call_recovers(isolated, reference):
    pid, starts = isolated.engine.pid, isolated.engine.worker.starts
    with pytest.raises(EngineCrashed) as e:
        isolated.engine.worker.call("abort", "")   # as a failed engine assert aborts
    assert "signal 6" in str(e.value) and "sdcpp_test_abort" in str(e.value)
    result = isolated.generate("a quiet harbour", **GEN)          # a new worker, models reloaded
    assert np.array_equal(np.asarray(result.image), reference)
    assert isolated.engine.worker.starts == starts + 1 and isolated.engine.pid != pid


def test_cancel_and_ctrl_c_reach_the_worker(isolated, reference, sigint_raises):
    latent = isolated.denoise(isolated.encode("a quiet harbour"), width=768, height=768, steps=1, seed=1)
    pid = isolated.engine.pid
    timer = threading.Timer(0.8, isolated.cancel)
    timer.start()
    start = time.perf_counter()
    with pytest.raises(Cancelled):
        isolated.decode(latent)                                  # ~2 s when not stopped
    assert time.perf_counter() - start < 2.5
    if threading.current_thread() is threading.main_thread():
        timer = threading.Timer(0.8, lambda: os.kill(os.getpid(), signal.SIGINT))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            isolated.decode(latent)
    token = threading.Event()
    threading.Timer(0.8, token.set).start()
    with pytest.raises(Cancelled):
        isolated.decode(latent, cancel=token)
    assert isolated.engine.pid == pid                            # stopped, not killed
    assert np.array_equal(np.asarray(isolated.generate("a quiet harbour", **GEN).image), reference)


def test_closed_isolated_pipeline_refuses_calls(tiny_sets):
    m = tiny_sets["flux2-klein"]
    p = Pipeline(diffusion_model=m.diffusion_model, llm=m.llm, vae=m.vae, n_threads=2, isolate=True)
    process = p.engine.worker.process
    p.close()
    p.close()
    assert p.closed and process.poll() is not None
    with pytest.raises(Exception, match="closed"):
        p.generate("a", **GEN)
