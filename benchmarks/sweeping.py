"""Sweep suite: a 16-row grid in one process and on Ray (1 and 2 actors of 1 CPU), images per
minute, and what the Ray path costs per image on top of the actors' own work.

    python benchmarks/run.py --suites sweep [--quick]
    python benchmarks/sweeping.py --child spec.json        # one measured process

One child process per family runs, one after the other: ``sdcpp_py.batch.run`` with 1 and
with 2 threads, then ``sdcpp_py.ray.run_grid`` on a local Ray (``ray.init(num_cpus=2)``)
with 1 actor and with 2 actors of 1 CPU each, each into a fresh folder, all of the same
16 rows (4 prompts x 4 seeds). Wall times include loading the models (once per process or
actor). The actors' own work is what their records say: the pipeline's load and each
row's encode + denoise + decode + PNG; Ray's overhead per image is the wall time beyond
the busiest actor's own work (start-up of the actor processes and Ray Data's scheduling
and transfers), over the rows. The images of every path must be equal, byte for byte.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import emit, ratio, run_script  # noqa: E402

PROMPTS = ("a lighthouse on a cliff at dawn", "a red fox in fresh snow", "a bowl of ramen, studio light",
           "an old tram in the rain at night")


def _pngs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.glob("*.png")}


def _own_work(out: Path) -> tuple[float, float, float]:
    """The busiest worker's load + row time, the rows' mean row time, and their mean load time."""
    per_worker: dict[int, float] = defaultdict(float)
    rows = []
    loads = []
    for p in out.glob("*.json"):
        if p.name.startswith("."):                  # the folder's manifest, not a row
            continue
        r = json.loads(p.read_text())
        per_worker[r["pid"]] += r["load_s"] + r["total_s"]
        rows.append(r["total_s"])
        if r["load_s"]:
            loads.append(r["load_s"])
    return max(per_worker.values()), sum(rows) / len(rows), sum(loads) / max(1, len(loads))


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import ray

    from sdcpp_py import grid as grids
    from sdcpp_py.backends import cpu_variant
    from sdcpp_py.batch import run
    from sdcpp_py.ray import run_grid

    work = Path(spec["work"])
    g = grids.build({"models": {"m": {**spec["files"], "settings": spec.get("context", {})}},
                     "defaults": {"size": f"{spec['width']}x{spec['height']}", "steps": spec["steps"]},
                     "sweeps": {"seeds": {"prompt": list(PROMPTS), "seed": "1:4"}}})
    n = len(g.rows)
    paths: list[dict[str, Any]] = []
    images: dict[str, dict[str, bytes]] = {}

    def record(name: str, out: Path, wall: float, actors: int) -> None:
        busiest, row_s, load_s = _own_work(out)
        paths.append({"path": name, "actors": actors, "wall_s": round(wall, 2),
                      "images_per_minute": round(60 * n / wall, 2), "row_s": round(row_s, 3),
                      "load_s": round(load_s, 2), "busiest_worker_s": round(busiest, 2),
                      "overhead_s_per_image": round(max(0.0, wall - busiest) / n, 3),
                      "overhead_fraction": round(max(0.0, wall - busiest) / busiest, 4)})
        images[name] = _pngs(out)

    for threads in (1, 2):
        out = work / f"inproc-{threads}"
        t = time.perf_counter()
        report = run(g, out, n_threads=threads)
        assert report.made == n, report
        record(f"in-process, {threads} thread{'s' * (threads > 1)}", out, time.perf_counter() - t, 1)
    os.chdir(work)          # Ray puts the driver's folder on its workers' sys.path: not a checkout's
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    for actors in (1, 2):
        out = work / f"ray-{actors}"
        t = time.perf_counter()
        report = run_grid(g, out, actors=actors, cpus_per_actor=1)
        assert report.made == n and not report.missing, report
        record(f"Ray, {actors} actor{'s' * (actors > 1)} x 1 CPU", out, time.perf_counter() - t, actors)
    ray.shutdown()
    one_thread = images["in-process, 1 thread"]
    equal = {name: pngs == one_thread for name, pngs in images.items()}
    return {"rows": n, "cpu_variant": cpu_variant(), "paths": paths, "equal_to_in_process": equal}


def run(family: str, models: Any, args: Any, work: Path) -> dict[str, Any]:
    try:
        import ray.data  # noqa: F401
    except ImportError:
        return {"family": family, "skipped": "Ray Data is not installed: pip install '.[ray]'"}
    shutil.rmtree(work / family, ignore_errors=True)       # fresh folders: every row made again
    spec = {"files": {"diffusion_model": str(models.diffusion_model), "llm": str(models.llm),
                      "vae": str(models.vae)},
            # the file's type as stored: two actors' pipelines side by side fit in memory
            "context": {"upcast": "none"}, "width": args.width, "height": args.height, "steps": args.steps,
            "work": str(work / family)}
    r = run_script("sweeping.py", spec, work, f"{family}-sweep")
    return {"family": family, "spec": spec, "peak_rss_mb": r.peak_rss_mb, **r.report}


def markdown(res: dict[str, Any]) -> list[str]:
    if "skipped" in res:
        return [f"### {res['family']}: skipped ({res['skipped']})", ""]
    s = res["spec"]
    base = res["paths"][0]["images_per_minute"]
    lines = [f"### {res['family']}: {res['rows']} rows, {s['width']}x{s['height']}, {s['steps']} steps "
             f"(CPU module {res['cpu_variant']})", "",
             "| path | wall s | images per minute | x in-process 1 thread | row s (mean) | load s | "
             "Ray overhead s per image | overhead / busiest actor's work | images equal |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in res["paths"]:
        on_ray = p["path"].startswith("Ray")
        overhead = f"{p['overhead_s_per_image']} | {100 * p['overhead_fraction']:.1f}%" if on_ray else " | "
        equal = "yes" if res["equal_to_in_process"][p["path"]] else "NO"
        lines.append(f"| {p['path']} | {p['wall_s']} | {p['images_per_minute']} | "
                     f"{ratio(p['images_per_minute'], base)} | {p['row_s']} | {p['load_s']} | {overhead} | {equal} |")
    return lines + [""]


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", type=Path, required=True)
    a = ap.parse_args()
    emit(child(json.loads(a.child.read_text())))
