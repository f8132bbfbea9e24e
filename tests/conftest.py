"""Fixtures: tiny synthetic models of both families, written by the package itself."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from sdcpp_py import Pipeline
from sdcpp_py.synthetic import SyntheticModelSet, write_model_set

FAMILIES = ("z-image-turbo", "flux2-klein")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_sets(model_dir) -> dict:
    return {f: write_model_set(f, model_dir, size="tiny", seed=1) for f in FAMILIES}


@pytest.fixture(scope="session")
def tiny(tiny_sets, family) -> SyntheticModelSet:
    return tiny_sets[family]


@pytest.fixture(scope="session")
def pipelines(tiny_sets):
    pipes = {f: Pipeline(diffusion_model=m.diffusion_model, llm=m.llm, vae=m.vae, n_threads=2)
             for f, m in tiny_sets.items()}
    yield pipes
    for p in pipes.values():
        p.close()


@pytest.fixture(scope="session")
def pipe(pipelines, family) -> Pipeline:
    return pipelines[family]


@pytest.fixture(scope="session")
def sd_cli() -> Path:
    """Upstream's sd-cli from the same build; SDCPP_PY_REQUIRE_CLI=1 (CI) makes its absence a failure."""
    from sdcpp_py.system import sd_cli_path

    path = sd_cli_path()
    if path is None:
        if os.environ.get("SDCPP_PY_REQUIRE_CLI") == "1":
            pytest.fail("sd-cli is required (SDCPP_PY_REQUIRE_CLI=1) but was not built")
        pytest.skip("sd-cli not built (install with SDCPP_PY_BUILD_CLI=ON)")
    return path


def pytest_collection_modifyitems(config, items):
    if os.environ.get("SDCPP_PY_RUN_SLOW") != "1":
        skip = pytest.mark.skip(reason="full-size model test: set SDCPP_PY_RUN_SLOW=1")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def sigint_raises():
    """SIGINT raising KeyboardInterrupt, as at a terminal. A process started in the background
    by a non-interactive shell (``cmd &``, nohup) inherits SIGINT ignored, and Python then never
    installs its handler: tests that send SIGINT put it back for their duration."""
    if threading.current_thread() is not threading.main_thread():
        yield   # signals reach the main thread only; such tests skip themselves
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
