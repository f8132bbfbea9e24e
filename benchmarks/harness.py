"""Shared pieces of the benchmarks: child processes measured for wall time and peak
RSS, machine and build facts, synthetic model cache, result files."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = Path(os.environ.get("SDCPP_PY_BENCH_RESULTS", HERE / "results"))
CACHE = Path(os.environ.get("SDCPP_PY_BENCH_CACHE", HERE / "cache"))

# sd-cli log lines that carry its own stage timings
_STAGES = {
    "load_s": r"loading tensors completed, taking ([\d.]+)s",
    "encode_s": r"get_learned_condition completed, taking ([\d.]+)s",
    "denoise_s": r"sampling completed, taking ([\d.]+)s",
    "decode_s": r"decode_first_stage completed, taking ([\d.]+)s",
}


@dataclass
class Run:
    """One child process: what it printed as JSON (if anything) and what it cost."""

    cmd: list[str]
    wall_s: float
    peak_rss_mb: float
    returncode: int
    report: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_child(cmd: list[str], *, env: dict[str, str] | None = None, log: Path | None = None) -> Run:
    """Run a command to completion; wall time and the child's peak RSS (wait4)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(out)
    report: dict[str, Any] = {}
    for line in reversed(out.splitlines()):
        if line.startswith("BENCH_JSON "):
            report = json.loads(line[len("BENCH_JSON "):])
            break
    stages = {k: sum(float(m) for m in re.findall(rx, out)) for k, rx in _STAGES.items() if re.search(rx, out)}
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{out[-3000:]}")
    return Run(cmd, wall, usage.ru_maxrss / 1024.0, proc.returncode, report, stages)


def emit(report: dict[str, Any]) -> None:
    """What a child prints for run_child to pick up."""
    print("BENCH_JSON " + json.dumps(report), flush=True)


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                            "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu_model"] = re.search(r"model name\s*:\s*(.*)", cpuinfo).group(1)
        flags = set(re.search(r"flags\s*:\s*(.*)", cpuinfo).group(1).split())
        info["cpu_flags"] = sorted(f for f in flags if re.match(r"(avx|fma|f16c|amx|sse4|bmi)", f))
        info["mem_gb"] = round(int(re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 2**20, 1)
    except (OSError, AttributeError):
        pass
    try:
        import sdcpp_py

        si = sdcpp_py.system_info()
        info["sdcpp_py"] = si["sdcpp_py"]
        info["engine"] = si["engine_version"]
        info["build_features"] = sorted(k for k, v in si["cpu_features"].items() if v)
    except Exception as e:  # the harness must describe a broken install too
        info["sdcpp_py_error"] = repr(e)
    return info


def run_spec(spec: dict[str, Any], work: Path, name: str, env: dict[str, str] | None = None) -> Run:
    """Run benchmarks/child.py on a spec in its own process."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{name}.json"
    path.write_text(json.dumps(spec, default=str))
    return run_child([sys.executable, str(HERE / "child.py"), str(path)], env=env, log=work / f"{name}.log")


def run_script(script: str, spec: dict[str, Any], work: Path, name: str) -> Run:
    """Run ``benchmarks/<script> --child SPEC`` (a suite's own child) on a spec in its own process."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{name}.json"
    path.write_text(json.dumps(spec, default=str))
    return run_child([sys.executable, str(HERE / script), "--child", str(path)], log=work / f"{name}.log")


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")
