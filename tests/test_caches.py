"""Step caches (sd_cache_params_t): every mode for these DiTs through the request, the steps each
skipped reported, the same pixels as sd-cli with the same flags, bad options refused."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from PIL import Image

from sdcpp_py import InvalidArgumentError, read_parameters
from sdcpp_py.cli import main

KW = dict(width=128, height=128, steps=8, seed=5)


@pytest.mark.parametrize("mode, options", [("easycache", "threshold=5"), ("dbcache", "threshold=0.5,warmup=1"),
                                           ("taylorseer", None), ("cache-dit", "threshold=0.5,warmup=1,Fn=1"),
                                           ("spectrum", "warmup=1,w=0.5")])
def test_every_mode_runs_and_says_what_it_skipped(pipe, mode, options):
    base = pipe.generate("a harbour", **KW)
    cached = pipe.generate("a harbour", cache_mode=mode, cache_options=options, **KW)
    assert cached.settings.cache_mode == mode and cached.settings.cache_options == options
    skipped = cached.timings["cache_skipped_steps"]
    assert 0 <= skipped < KW["steps"]
    if skipped:
        assert not np.array_equal(cached.arrays[0], base.arrays[0])
    s = pipe.settings_for("a harbour", cache_mode=mode, cache_options=options, **KW)
    item = next(pipe.images(s))
    assert np.array_equal(np.asarray(item.image), cached.arrays[0])            # staged == one-shot
    assert item.timings["cache_skipped_steps"] == skipped
    assert "cache_skipped_steps" not in pipe.generate("a harbour", **KW).timings


def test_a_cache_equals_sd_cli_and_lands_in_the_png(sd_cli, tiny_sets, pipelines, tmp_path):
    m = tiny_sets["z-image-turbo"]
    args = ["--diffusion-model", str(m.diffusion_model), "--llm", str(m.llm), "--vae", str(m.vae), "-p",
            "a harbour", "-W", "128", "-H", "128", "--steps", "8", "-s", "5", "-t", "2", "--cfg-scale", "1",
            "--cache-mode", "dbcache", "--cache-option", "threshold=0.5,warmup=1"]
    run = subprocess.run([str(sd_cli), *args, "-o", str(tmp_path / "cli.png")], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = np.asarray(Image.open(tmp_path / "cli.png").convert("RGB"))
    ours = pipelines["z-image-turbo"].generate("a harbour", cache_mode="dbcache",
                                               cache_options="threshold=0.5,warmup=1", **KW)
    assert ours.timings["cache_skipped_steps"] > 0
    assert np.array_equal(ours.arrays[0], theirs)
    assert main([*args, "-o", str(tmp_path / "ours.png"), "--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "ours.png").convert("RGB")), theirs)
    stored = read_parameters(tmp_path / "ours.png").settings
    assert (stored.cache_mode, stored.cache_options) == ("dbcache", "threshold=0.5,warmup=1")


def test_bad_cache_settings_are_refused(pipe):
    cases = [({"cache_mode": "fastcache"}, "unknown cache mode"), ({"cache_mode": "ucache"}, "UNet"),
             ({"cache_mode": "easycache", "cache_options": "Fn=3"}, "easycache takes"),
             ({"cache_mode": "dbcache", "cache_options": "threshold=lots"}, "not a number"),
             ({"cache_mode": "dbcache", "cache_options": "warmup=1.5"}, "out of range"),
             ({"cache_options": "threshold=1"}, "need a cache_mode"),
             ({"cache_mode": "cache-dit", "scm_mask": "1,2,0"}, "scm_mask"),
             ({"cache_mode": "cache-dit", "scm_policy": "sometimes"}, "scm_policy")]
    for settings, message in cases:
        with pytest.raises(InvalidArgumentError, match=message):
            pipe.generate("x", **settings, **KW)
    assert pipe.generate("x", width=64, height=64, steps=1).image.size == (64, 64)


def test_cache_mode_ids_are_the_engines():
    from sdcpp_py._ffi import lib
    from sdcpp_py._marshal import CACHE_MODE_IDS

    names = {"easycache": "EASYCACHE", "ucache": "UCACHE", "dbcache": "DBCACHE", "taylorseer": "TAYLORSEER",
             "cache-dit": "CACHE_DIT", "spectrum": "SPECTRUM"}
    assert {m: getattr(lib, f"SD_CACHE_{n}") for m, n in names.items()} == CACHE_MODE_IDS
