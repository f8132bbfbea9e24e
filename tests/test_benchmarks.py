"""The benchmark harness keeps working: its quick mode runs end to end (no timing asserts)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdcpp_py.system import sd_cli_path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_staged_sweep_quick(tmp_path):
    if sd_cli_path() is None:
        if os.environ.get("SDCPP_PY_REQUIRE_CLI") == "1":
            pytest.fail("sd-cli is required (SDCPP_PY_REQUIRE_CLI=1) but was not built")
        pytest.skip("sd-cli not built")
    env = {**os.environ, "SDCPP_PY_BENCH_CACHE": str(tmp_path / "cache"),
           "SDCPP_PY_BENCH_RESULTS": str(tmp_path / "results")}
    run = subprocess.run([sys.executable, str(BENCH / "staged_sweep.py"), "--quick", "--seeds", "2",
                          "--width", "64", "--height", "64"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = Path(run.stdout.strip().splitlines()[-1].split("results: ", 1)[1])
    data = json.loads(result.read_text())
    assert len(data["sd_cli"]) == 2 and len(data["ours"]["report"]["items"]) == 2
    assert data["summary"]["speedup_vs_sd_cli"] > 0 and data["summary"]["overhead_ratio"] > 0
    assert data["memory"]["released"]["peak_rss_mb"] > 0
    assert "AVX2" in data["machine"]["build_features"]
    assert (tmp_path / "cache" / "images" / "cli-1.png").is_file()
