"""One request from every face to the engine: a field added to the request (and its marshalling)
reaches the engine through generate(), a CLI prompt file, the server and a grid row, with no
other code changed; the models import without the native library."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import sdcpp_py
from sdcpp_py import InvalidArgumentError, read_parameters, settings
from sdcpp_py import grid as grids
from sdcpp_py.batch import run as run_grid
from sdcpp_py.cli import main as cli_main
from sdcpp_py.settings import GenerationSettings, parse_request

SMALL = {"width": 64, "height": 64, "steps": 1}


@dataclass(frozen=True)
class KnobRequest(GenerationSettings):
    """The request with one throwaway field, as a new parameter would add it."""

    test_knob: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.test_knob is not None and not 0 <= self.test_knob <= 10:
            raise InvalidArgumentError(f"test_knob must be in [0, 10], got {self.test_knob}")


@pytest.fixture
def knob(monkeypatch):
    """The new field, and its marshalling: what the engine thread wrote for each call."""
    from sdcpp_py import _marshal

    seen: list[float] = []
    monkeypatch.setattr(settings, "REQUEST", KnobRequest)
    monkeypatch.setitem(_marshal.SETTERS, "test_knob", lambda params, value, keep: seen.append(value))
    return seen


def test_a_new_field_reaches_the_engine_from_every_face(knob, tiny_sets, pipelines, tmp_path):
    m = tiny_sets["z-image-turbo"]
    files = {"diffusion_model": str(m.diffusion_model), "llm": str(m.llm), "vae": str(m.vae)}

    # the Python API, one-shot and staged
    result = pipelines["z-image-turbo"].generate("a knob", test_knob=1.5, seed=3, **SMALL)
    assert knob[-1] == 1.5 and result.settings.test_knob == 1.5
    cond = pipelines["z-image-turbo"].encode("a knob")
    pipelines["z-image-turbo"].denoise(cond, test_knob=1.75, seed=3, **SMALL)
    assert knob[-1] == 1.75
    with pytest.raises(InvalidArgumentError, match="test_knob"):
        pipelines["z-image-turbo"].generate("a knob", test_knob=11.0, **SMALL)

    # a CLI prompt file (JSON lines), written with the field in its PNG metadata
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(json.dumps({"prompt": "a knob from a file", "test_knob": 2.5}) + "\n")
    out = tmp_path / "cli.png"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in files.items()]
    assert cli_main([*args, "--prompt-file", str(prompts), "-W", "64", "-H", "64", "--steps", "1", "-t", "2",
                     "-o", str(out), "--no-progress"]) == 0
    assert knob[-1] == 2.5 and read_parameters(out).settings.test_knob == 2.5

    # the server: an extra field of OpenAI's body
    fastapi_testclient = pytest.importorskip("fastapi.testclient")
    from sdcpp_py.server import Limits, ModelSet, Registry, ServerConfig, create_app

    entry = ModelSet("tiny", files, {"n_threads": 2})
    registry = Registry([entry])
    try:
        app = create_app(registry, ServerConfig((entry,), Limits()))
        with fastapi_testclient.TestClient(app) as client:
            reply = client.post("/v1/images/generations", json={"prompt": "a knob by http", "size": "64x64",
                                                                   "steps": 1, "test_knob": 3.5})
            assert reply.status_code == 200, reply.text
            assert knob[-1] == 3.5
            bad = client.post("/v1/images/generations", json={"prompt": "x", "size": "64x64", "test_knob": 12})
            assert bad.status_code == 400 and "test_knob" in bad.json()["error"]["message"]
    finally:
        registry.close()

    # a grid row: made with it, its record's column and its PNG hold it, and its id depends on it
    spec = {"models": {"tiny": files}, "rows": [{"prompt": "a knob in a grid", "seed": 1, "size": "64x64",
                                                  "steps": 1, "test_knob": 4.5}]}
    grid = grids.build(spec)
    other = grids.build({**spec, "rows": [{**spec["rows"][0], "test_knob": 4.25}]})
    assert grid.rows[0].row_id != other.rows[0].row_id
    report = run_grid(grid, tmp_path / "sweep", n_threads=2)
    assert report.made == 1 and knob[-1] == 4.5
    record = json.loads((tmp_path / "sweep" / f"{grid.rows[0].row_id}.json").read_text())
    assert record["test_knob"] == 4.5
    assert read_parameters(tmp_path / "sweep" / f"{grid.rows[0].row_id}.png").settings.test_knob == 4.5


def test_faces_parse_through_the_requests_fields():
    assert parse_request({"steps": "4", "cfg_scale": "2.5", "vae_tiling": "yes", "sigmas": "1,0.5,0",
                          "sampler": "Euler"}, text=True) == {
        "steps": 4, "cfg_scale": 2.5, "vae_tiling": True, "sigmas": (1.0, 0.5, 0.0), "sampler": "Euler"}
    assert parse_request({"steps": 4.0, "guidance": None, "seed": float("nan"), "sigmas": [1, 0]}) == {
        "steps": 4, "sigmas": (1, 0)}
    for bad, message in (({"stepz": 1}, "unknown key 'stepz'"), ({"steps": "²"}, "steps"),
                         ({"steps": "9" * 5000}, "steps"), ({"vae_tiling": "maybe"}, "vae_tiling")):
        with pytest.raises(InvalidArgumentError, match=message):
            parse_request(bad, text=True)
    assert settings.request(prompt="p", sampler="Euler").sampler == "euler"      # one spelling


def test_one_parameter_lives_in_few_modules():
    package = Path(sdcpp_py.__file__).parent
    where = sorted(str(p.relative_to(package)) for p in package.rglob("*.py") if "flow_shift" in p.read_text())
    # the request, its marshalling, the CLI's flag table, sd-cli's metadata layout
    assert len(where) <= 4, where


def test_models_import_without_the_native_library(tmp_path):
    code = ("import sys; import sdcpp_py.settings, sdcpp_py.grid, sdcpp_py.metadata, sdcpp_py.checks, "
            "sdcpp_py.weights, sdcpp_py.synthetic, sdcpp_py.modelset, sdcpp_py.presets; "
            "assert 'sdcpp_py._ffi' not in sys.modules, sorted(sys.modules)\n"
            "try:\n    from sdcpp_py import Pipeline\nexcept sdcpp_py.LibraryError as e:\n    print('refused:', e)")
    env = {**os.environ, "SDCPP_PY_LIBRARY": str(tmp_path / "missing.so"), "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert "refused: native library not found" in run.stdout


def test_only_the_engine_touches_the_ffi():
    """Core, Models and faces import neither the FFI nor the marshalling (DESIGN.md's parts).

    The engine part is every module that owns a native context or builds native values: the
    generation Engine and its worker, and the Upscaler (one ESRGAN context on the engine thread)."""
    import ast

    package = Path(sdcpp_py.__file__).parent
    engine = {"_ffi.py", "_lib_types.py", "_marshal.py", "_callbacks.py", "_engine_thread.py", "engine.py",
              "isolated.py", "residency.py", "backends.py", "system.py", "upscaler.py"}
    reach = []
    for path in package.rglob("*.py"):
        if path.name in engine and path.parent == package:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[-1] in (
                    "_ffi", "_marshal", "_lib_types", "_callbacks"):
                reach.append(f"{path.relative_to(package)}: {node.module}")
    assert not reach, reach
