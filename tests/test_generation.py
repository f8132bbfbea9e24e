import logging
import shutil

import numpy as np
import pytest

from sdcpp_py import GenerationSettings, Pipeline
from sdcpp_py.settings import SEED_RANGE


def _gen(pipe, **kw):
    args = dict(width=64, height=48, steps=2, seed=7)
    args.update(kw)
    return pipe.generate("a red fox in the snow", **args)


def test_image_size_and_content(pipe):
    r = _gen(pipe, width=96, height=64)
    assert r.image.size == (96, 64)
    a = r.arrays[0]
    assert a.shape == (64, 96, 3) and a.dtype == np.uint8
    assert a.std() > 1.0, "image is constant"
    assert len(np.unique(a.reshape(-1, 3), axis=0)) > 10


def test_settings_are_reported(pipe):
    r = _gen(pipe)
    s = r.settings
    assert isinstance(s, GenerationSettings)
    assert (s.width, s.height, s.steps, s.seed) == (64, 48, 2, 7)
    assert s.cfg_scale == 1.0  # the presets' distilled default
    assert s.sampler == "euler" and s.scheduler  # resolved, not None
    assert r.seeds == [7]
    assert r.timings["generate_s"] > 0


def test_same_seed_same_image_other_seed_other_image(pipe):
    a = _gen(pipe, seed=123).arrays[0]
    b = _gen(pipe, seed=123).arrays[0]
    c = _gen(pipe, seed=124).arrays[0]
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_random_seed_is_resolved_and_reported(pipe):
    r1 = _gen(pipe, seed=None)
    r2 = _gen(pipe, seed=None)
    for r in (r1, r2):
        assert SEED_RANGE[0] <= r.seeds[0] <= SEED_RANGE[1]
    assert r1.seeds[0] != r2.seeds[0]
    # the reported seed reproduces the image
    again = _gen(pipe, seed=r1.seeds[0])
    assert np.array_equal(again.arrays[0], r1.arrays[0])


def test_batch_uses_consecutive_seeds(pipe):
    r = _gen(pipe, seed=40, batch_count=2)
    assert r.seeds == [40, 41] and len(r.images) == 2
    single = _gen(pipe, seed=41)
    assert np.array_equal(r.arrays[1], single.arrays[0])


def test_progress_callback_sees_every_step(pipe):
    seen = []
    _gen(pipe, steps=3, progress=lambda step, steps, t: seen.append((step, steps)))
    assert (3, 3) in seen
    assert {s for s, n in seen if n == 3} >= {1, 2, 3}


def test_progress_exception_reaches_caller_and_context_survives(pipe):
    class Stop(Exception):
        pass

    def boom(step, steps, t):
        raise Stop("from callback")

    with pytest.raises(Stop):
        _gen(pipe, progress=boom)
    assert _gen(pipe).image.size == (64, 48)


def test_models_stay_resident(tiny, tmp_path, caplog):
    """Weights are loaded once: later calls log no loading and need no files."""
    files = {}
    for role in ("diffusion_model", "llm", "vae"):
        files[role] = tmp_path / getattr(tiny, role).name
        shutil.copy(getattr(tiny, role), files[role])
    caplog.set_level(logging.DEBUG, logger="sdcpp_py.native")
    with Pipeline(**files, n_threads=2) as pipe:
        loading = [r.getMessage() for r in caplog.records if "loading" in r.getMessage()]
        assert any("loading diffusion model" in m for m in loading)
        first = _gen(pipe).arrays[0]
        caplog.clear()
        for f in files.values():
            f.unlink()  # nothing can be read from disk any more
        second = _gen(pipe).arrays[0]
        assert not [r for r in caplog.records if "loading" in r.getMessage()]
        assert np.array_equal(first, second)
        assert pipe.load_count == 1
