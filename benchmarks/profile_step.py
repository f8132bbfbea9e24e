"""Where a DiT step's time goes: `perf record` (cpu-clock samples) around the denoising
call only, then the samples grouped by the kernel they landed in (repacked and plain
quantized matmuls, F16/BF16 GEMMs, the activations' quantization, attention, norms, RoPE,
copies, element-wise ops, threads waiting at barriers).

    python benchmarks/profile_step.py --child SPEC     # the profiled process (perf starts it)

The parent (``profile(...)``) starts ``perf record -D -1 --control fifo:...`` around the
child; the child loads and encodes with sampling off, then switches perf on for the
denoising call alone and off again before the VAE decode.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import emit  # noqa: E402

# (category, regex on the symbol), first match wins; ggml's CPU kernels by name
CATEGORIES: list[tuple[str, str]] = [
    ("matmul, repacked weights (ggml_gemm/gemv_*, the int8 VNNI GEMMs)", r"ggml_gemm_|ggml_gemv_|_vnni"),
    ("matmul, quantized dot products (vec_dot_q*)", r"ggml_vec_dot_(q|iq|mxfp|tq)"),
    ("matmul, F16/BF16/F32 (tinyBLAS, vec_dot_f16/bf16)", r"tinyBLAS|sgemm|ggml_vec_dot_(f16|bf16|f32)|llamafile"),
    ("matmul driver (ggml_compute_forward_mul_mat)", r"forward_mul_mat"),
    ("activations quantized for the matmul (from_float)", r"quantize_(row|mat)|from_float|ggml_cpu_fp32_to|fp32_to_"),
    ("attention (flash attention, soft_max)", r"flash_attn|soft_max|softmax"),
    ("norms (rms_norm, norm)", r"norm"),
    ("RoPE", r"rope"),
    ("copies and layout (cpy, dup, cont, get_rows, concat)", r"cpy|dup|cont|get_rows|set_rows|concat|memcpy|memmove|pad"),
    ("element-wise (add, mul, scale, gelu, silu, glu)", r"add|mul|scale|gelu|silu|glu|unary|binary|tanh|sigmoid|exp"),
    ("threads waiting (barrier, yield)", r"barrier|sched_yield|graph_compute_thread|futex|pthread|omp|spin|pause"),
]


WAITING = "threads waiting (barrier, yield)"
UNRESOLVED = "unresolved addresses (a library without symbols)"


def categorize(symbols: list[tuple[float, str, str]]) -> list[dict[str, Any]]:
    """(percent, dso, symbol) rows -> percent per category, in CATEGORIES order, then the rest."""
    totals = {name: 0.0 for name, _ in CATEGORIES}
    totals[UNRESOLVED] = totals["other"] = 0.0
    for pct, dso, sym in symbols:
        if dso.startswith("libgomp"):      # OpenMP's spin-wait at ggml's barriers
            name = WAITING
        elif re.fullmatch(r"0x[0-9a-f]+", sym):
            name = UNRESOLVED
        else:
            name = next((n for n, rx in CATEGORIES if re.search(rx, sym, re.IGNORECASE)), "other")
        totals[name] += pct
    return [{"category": k, "percent": round(v, 2)} for k, v in totals.items() if v > 0]


def parse_report(text: str) -> list[tuple[float, str, str]]:
    """`perf report --stdio --no-children --sort dso,sym` lines -> (percent, dso, symbol)."""
    rows = []
    for line in text.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[[.k]\]\s+(.*\S)", line)
        if m:
            rows.append((float(m.group(1)), m.group(2), m.group(3)))
    return rows


def profile(spec: dict[str, Any], work: Path, name: str, freq: int = 499,
            env: dict[str, str] | None = None) -> dict[str, Any]:
    """Profile the denoising call of one generation (``env``: added to the child's environment);
    {"skipped": why} without a working perf."""
    perf = shutil.which("perf")
    if perf is None:
        return {"skipped": "perf not installed (Debian: linux-perf)"}
    work.mkdir(parents=True, exist_ok=True)
    ctl, ack, data = work / f"{name}.ctl", work / f"{name}.ack", work / f"{name}.perf.data"
    for fifo in (ctl, ack):
        fifo.unlink(missing_ok=True)
        os.mkfifo(fifo)
    spec_path = work / f"{name}.json"
    spec_path.write_text(json.dumps({**spec, "perf_ctl": str(ctl), "perf_ack": str(ack)}, default=str))
    # -N: record does not put the (stripped) installed libraries in perf's build-id cache
    cmd = [perf, "record", "-N", "-F", str(freq), "-D", "-1", "--control", f"fifo:{ctl},{ack}", "-o", str(data),
           "--", sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    (work / f"{name}.log").write_text(run.stdout + run.stderr)
    if run.returncode != 0:
        return {"skipped": f"perf record failed ({run.returncode}): {(run.stderr or run.stdout)[-400:]}"}
    child = next((json.loads(line[11:]) for line in reversed(run.stdout.splitlines())
                  if line.startswith("BENCH_JSON ")), {})
    symbols_from = _add_build_symbols(perf)
    report = subprocess.run([perf, "report", "-i", str(data), "--stdio", "--no-children", "--sort", "dso,sym"],
                            capture_output=True, text=True)
    symbols = parse_report(report.stdout)
    samples = re.search(r"# Samples: (\S+)", report.stdout)
    data.unlink(missing_ok=True)   # hundreds of MB; the grouped figures are what is kept
    return {"samples": samples.group(1) if samples else None, "symbols_from": symbols_from,
            "categories": categorize(symbols),
            "top": [{"percent": p, "dso": d, "symbol": s[:90]} for p, d, s in symbols[:15]], **child}


def _add_build_symbols(perf: str) -> str:
    """The installed libraries are stripped (tinyBLAS and most of ggml's kernels are static
    functions): hand perf the build tree's unstripped copies, which it matches by build id."""
    build = Path(__file__).resolve().parent.parent / "build"
    libs = sorted(build.glob("*/bin/lib*.so")) + sorted(build.glob("*/lib*.so"))
    for lib in libs:   # --add makes a new entry, --update replaces one that points at a stripped copy
        for flag in ("--add", "--update"):
            subprocess.run([perf, "buildid-cache", flag, str(lib)], capture_output=True)
    return f"{len(libs)} unstripped libraries from {build}" if libs else "the installed (stripped) libraries"


def _perf(ctl: str, ack: str, command: str) -> None:
    with open(ctl, "w") as f:
        f.write(command + "\n")
    with open(ack) as f:
        f.readline()


def child(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    from sdcpp_py import Pipeline

    pipe = Pipeline(**spec["files"], **spec.get("context", {}))
    cond = pipe.encode(spec["prompt"])
    item = spec["item"]
    pipe.denoise(cond, **{**item, "steps": 1})     # warm-up: the graph's first run allocates
    _perf(spec["perf_ctl"], spec["perf_ack"], "enable")
    t0 = time.perf_counter()
    latent = pipe.denoise(cond, **item)
    denoise_s = time.perf_counter() - t0
    _perf(spec["perf_ctl"], spec["perf_ack"], "disable")
    emit({"profiled_s": denoise_s, "step_s": latent.info["denoise_s"] / item.get("steps", 1),
          "weights": {c: f"{p['memory_type']} ({p['kernel']})" for c, p in pipe.weights["per_component"].items()}})
    pipe.close()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        sys.exit(__doc__)
