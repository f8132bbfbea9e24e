"""One pipeline under load: many threads mixing every call with cancels, memory across
open/close cycles and across generations, a decode-only VAE."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from sdcpp_py import Cancelled, InvalidArgumentError, Pipeline
from sdcpp_py.synthetic.models import _metadata, component_specs
from sdcpp_py.synthetic.writer import plan_tensors, write_file

GEN = dict(width=64, height=64, steps=1)
PROMPTS = ("a red door", "a blue boat", "a green hill")


# -- threads ---------------------------------------------------------------------------------
@pytest.mark.parametrize("release", [False, True], ids=["resident", "release-both"])
def test_eight_threads_mixed_calls_equal_their_references(tiny_sets, release):
    m = tiny_sets["z-image-turbo"]
    pipe = Pipeline(diffusion_model=m.diffusion_model, llm=m.llm, vae=m.vae, n_threads=2,
                    release_encoder=release, release_diffusion=release)
    try:
        # references, one thread
        ref_gen = {(p, s): np.asarray(pipe.generate(p, seed=s, **GEN).image) for p in PROMPTS for s in (1, 2)}
        ref_cond = {p: pipe.encode(p, use_cache=False).context for p in PROMPTS}
        ref_lat = {(p, s): pipe.denoise(pipe.encode(p), seed=s, **GEN).data for p in PROMPTS for s in (1, 2)}
        errors, counts = [], {"checked": 0, "cancelled": 0}
        lock = threading.Lock()

        def worker(k: int) -> None:
            rnd = random.Random(k)
            try:
                for _ in range(8):
                    p, s = rnd.choice(PROMPTS), rnd.choice((1, 2))
                    op = rnd.choices(("generate", "encode", "denoise", "decode", "cancel"), (3, 3, 3, 3, 1))[0]
                    try:
                        if op == "generate":
                            assert np.array_equal(np.asarray(pipe.generate(p, seed=s, **GEN).image), ref_gen[(p, s)])
                        elif op == "encode":
                            assert np.array_equal(pipe.encode(p, use_cache=False).context, ref_cond[p])
                        elif op == "denoise":
                            assert np.array_equal(pipe.denoise(pipe.encode(p), seed=s, **GEN).data, ref_lat[(p, s)])
                        elif op == "decode":
                            lat = pipe.denoise(pipe.encode(p), seed=s, **GEN)
                            assert np.array_equal(np.asarray(pipe.decode(lat)), ref_gen[(p, s)])
                        else:
                            pipe.cancel()
                            continue
                        with lock:
                            counts["checked"] += 1
                    except Cancelled:
                        with lock:
                            counts["cancelled"] += 1
            except BaseException as e:   # reported by the main thread
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not any(t.is_alive() for t in threads)
        assert not errors, errors[:3]
        print(f"{counts['checked']} results equal to their references, {counts['cancelled']} cancelled")
        assert counts["checked"] >= 16   # (cancel stops every call in flight at the time)
    finally:
        pipe.close()


# -- memory ----------------------------------------------------------------------------------
# Each scenario runs in a fresh interpreter: the suite's own state (other tests' threads, malloc
# arenas grown by them, session fixtures) moved this process's RSS by several percent between
# runs, which is noise to a leak check. RSS is read after gc, the frees that gc's finalizers
# queued on the engine thread, and malloc_trim: memory that is free but cached by the
# allocator does not count; memory still held does.
MEMORY_CODE = r"""
import ctypes, gc, json, sys
from sdcpp_py import Pipeline
from sdcpp_py._engine_thread import ENGINE_THREAD
scenario, dm, llm, vae = sys.argv[1:5]
GEN = dict(width=64, height=64, steps=1)
libc = ctypes.CDLL(None)

def rss():
    gc.collect()                  # finalizers of dropped pipelines post their frees ...
    ENGINE_THREAD.run(lambda: None)   # ... which have run once a later call has
    libc.malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

def new():
    return Pipeline(diffusion_model=dm, llm=llm, vae=vae, n_threads=2)

if scenario == "cycles":          # open, generate, close
    def step(i):
        with new() as p:
            p.generate("a cat", seed=1, **GEN)
    warm, n = 5, 30
elif scenario == "generations":   # one resident pipeline
    pipe = new()
    def step(i):
        pipe.generate("a cat", seed=i, **GEN)
    warm, n = 10, 100
else:                             # pipelines dropped without close(): their finalizers free them
    def step(i):
        new().generate("a", seed=1, **GEN)
    warm, n = 3, 10
for i in range(warm):
    step(i)
samples = [rss()]
for i in range(n):
    step(i)
    samples.append(rss())
print(json.dumps(samples))
"""


@pytest.mark.parametrize("scenario, family", [("cycles", "flux2-klein"), ("generations", "z-image-turbo"),
                                              ("dropped", "z-image-turbo")])
def test_memory_does_not_grow(scenario, family, tiny_sets, tmp_path):
    m = tiny_sets[family]
    # cwd: `python -c` puts it first on sys.path, and a checkout there is not the installed package
    run = subprocess.run([sys.executable, "-c", MEMORY_CODE, scenario, str(m.diffusion_model), str(m.llm),
                          str(m.vae)], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    samples = np.array(json.loads(run.stdout.strip().splitlines()[-1]), dtype=float)
    growth = (samples[-1] - samples[0]) / samples[0]
    half = len(samples) // 2
    late = (samples[-1] - samples[half]) / samples[0]
    print(f"{scenario}: {len(samples) - 1} rounds, RSS {samples[0] / 2**20:.1f} MiB -> {samples[-1] / 2**20:.1f} "
          f"MiB ({growth * 100:+.2f}%; second half {late * 100:+.2f}%)")
    # a leak grows every round: a pipeline's weights or compute buffers (MBs for the tiny models)
    # left behind per round would add tens of percent over the second half. A one-time step is
    # not a leak (seen once in CI's run against the installed wheel: +7% in total, the libraries
    # there allocating something lazily once), so the second half decides; the total only bounds it
    shown = [round(x / 2**20, 1) for x in samples]
    assert late < 0.01, f"RSS grew over the second half: {shown} MiB"
    assert growth < 0.15, f"RSS grew: {shown} MiB"


# -- a decode-only VAE -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def decode_only_vae(tiny_sets, tmp_path_factory):
    out = {}
    for family in tiny_sets:
        specs = [s for s in component_specs(family, "vae")
                 if not s.name.startswith(("encoder.", "quant_conv."))]
        path = tmp_path_factory.mktemp("vae") / f"{family}-decoder-only.gguf"
        write_file(path, plan_tensors(specs, "f16"), seed=1, metadata=_metadata(family, "vae", "tiny", 1, "f16"),
                   fmt="gguf")
        out[family] = path
    return out


def test_a_decode_only_vae_serves_text_to_image(tiny, family, decode_only_vae, pipe):
    with Pipeline(diffusion_model=tiny.diffusion_model, llm=tiny.llm, vae=decode_only_vae[family],
                  n_threads=2) as p:
        assert not p.components.vae_has_encoder
        image = np.asarray(p.generate("a lighthouse", seed=5, **GEN).image)
        assert np.array_equal(image, np.asarray(pipe.generate("a lighthouse", seed=5, **GEN).image))
        source = Image.new("RGB", (64, 64), (120, 30, 200))
        with pytest.raises(InvalidArgumentError, match="decode-only VAE"):
            p.generate("a lighthouse", init_image=source, strength=0.5, **GEN)
        with pytest.raises(InvalidArgumentError, match="decode-only VAE"):
            p.encode_image(source)
        if family == "flux2-klein":
            with pytest.raises(InvalidArgumentError, match="decode-only VAE"):
                p.generate("a lighthouse", ref_images=[source], **GEN)
        assert np.array_equal(np.asarray(p.generate("a lighthouse", seed=5, **GEN).image), image)
