"""Control suite: how fast a cancel returns, what crash isolation costs, what close() gives back.

    python benchmarks/run.py --suites control                   # full-size Z-Image, 512x512
    python benchmarks/control.py --child spec.json              # one measured process

Figures, each from one child process on the same files:
- cancel latency: ``cancel()`` from another thread at several offsets into a DiT step and into a
  VAE decode, to the moment the call has raised Cancelled (and whether the graph was stopped
  midway, from the engine's count);
- memory: RSS after load, after N generations, after ``close()``; a second open/close cycle;
- isolation overhead: the same images in-process and with ``isolate=True``, interleaved.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import HERE, emit, ratio, run_child  # noqa: E402

PROMPT = "a lighthouse on a cliff at dawn, volumetric light"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def _cancel_at(pipe, call, offset_s: float, start_event=None) -> dict[str, Any]:
    """Run ``call()``; ``offset_s`` after ``start_event`` is set (or after the start) cancel it."""
    from sdcpp_py import Cancelled
    from sdcpp_py._ffi import lib

    aborted = lib.sdcpp_aborted_computes()
    marks: dict[str, float] = {}
    done = threading.Event()

    def canceller() -> None:
        if start_event is not None:
            start_event.wait()
        if not done.wait(offset_s):      # a call that ended first is not cancelled (nor the next one)
            marks["cancel"] = time.perf_counter()
            pipe.cancel()
    thread = threading.Thread(target=canceller, daemon=True)
    thread.start()
    start = time.perf_counter()
    try:
        call()
        outcome = "finished"
    except Cancelled:
        outcome = "cancelled"
    end = time.perf_counter()
    done.set()
    if start_event is not None:
        start_event.set()
    thread.join()
    return {"offset_s": offset_s, "outcome": outcome, "call_s": round(end - start, 3),
            "latency_s": round(end - marks.get("cancel", end), 4),
            "stopped_midway": lib.sdcpp_aborted_computes() > aborted}


def child(spec: dict[str, Any]) -> dict[str, Any]:
    from sdcpp_py import Pipeline

    files, ctx = spec["files"], spec.get("context", {})
    w, h = spec["width"], spec["height"]
    out: dict[str, Any] = {"rss_start_mb": round(_rss_mb(), 1)}
    t = time.perf_counter()
    pipe = Pipeline(**files, **ctx)
    out["load_s"] = round(time.perf_counter() - t, 2)
    out["rss_loaded_mb"] = round(_rss_mb(), 1)
    cond = pipe.encode(PROMPT)

    # cancel during a DiT step: the offset counts from the start of the first step; quick mode:
    # offsets as fractions of this machine's step (fixed ones landed after a fast CPU's 2 steps)
    offsets = spec.get("step_offsets")
    if not offsets:
        t = time.perf_counter()
        pipe.denoise(cond, width=w, height=h, steps=1, seed=1)
        offsets = [round(f * (time.perf_counter() - t), 3) for f in spec["step_fractions"]]
    rows = []
    for offset in offsets:
        started = threading.Event()

        def denoise(started: threading.Event = started) -> None:
            pipe.denoise(cond, width=w, height=h, steps=2, seed=1, progress=lambda i, n, s: started.set())
        rows.append(_cancel_at(pipe, denoise, offset, started))
    out["cancel_step"] = rows
    latent = pipe.denoise(cond, width=spec["decode_width"], height=spec["decode_height"], steps=1, seed=1)
    t = time.perf_counter()
    pipe.decode(latent)
    out["decode_s"] = round(time.perf_counter() - t, 2)
    # quick mode: offsets as fractions of this machine's decode (a fixed 1 s landed after the
    # decode's graph on a fast CPU, where the tiny 512x512 decode takes ~1.2 s)
    offsets = spec.get("decode_offsets") or [round(f * out["decode_s"], 2) for f in spec["decode_fractions"]]
    out["cancel_decode"] = [_cancel_at(pipe, lambda: pipe.decode(latent), o) for o in offsets]

    # memory: what the generations keep, what close() gives back, a second cycle
    iw, ih, n = spec["iso_width"], spec["iso_height"], spec["iso_images"]
    settings = dict(width=iw, height=ih, steps=spec["iso_steps"])
    for s in range(n):
        pipe.generate(PROMPT, seed=s, **settings)
    out["rss_after_generations_mb"] = round(_rss_mb(), 1)
    pipe.close()
    out["rss_after_close_mb"] = round(_rss_mb(), 1)
    pipe = Pipeline(**files, **ctx)
    pipe.generate(PROMPT, seed=0, **settings)
    pipe.close()
    out["rss_after_second_cycle_mb"] = round(_rss_mb(), 1)

    # isolation: the same images in-process and in a worker, interleaved (no order bias)
    local_pipe = Pipeline(**files, **ctx)
    iso = Pipeline(**files, **ctx, isolate=True)
    local_s, iso_s, local, remote = [], [], [], []
    for p in (local_pipe, iso):
        p.generate(PROMPT, seed=99, **settings)                 # warm-up at this size
    for s in range(n):
        for p, times, images in ((local_pipe, local_s, local), (iso, iso_s, remote)):
            t = time.perf_counter()
            images.append(p.generate(PROMPT, seed=s, **settings).image)
            times.append(time.perf_counter() - t)
    iso.close()
    local_pipe.close()
    out["in_process_s_per_image"] = round(sum(local_s) / n, 3)
    out["isolated_s_per_image"] = round(sum(iso_s) / n, 3)
    out["in_process_s"], out["isolated_s"] = [round(x, 3) for x in local_s], [round(x, 3) for x in iso_s]
    import numpy as np

    out["isolated_same_pixels"] = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(local, remote, strict=False))
    out["isolation_overhead"] = ratio(out["isolated_s_per_image"], out["in_process_s_per_image"])
    return out


def run(family: str, models, args, work: Path) -> dict[str, Any]:
    quick = args.quick
    spec = {"files": {"diffusion_model": str(models.diffusion_model), "llm": str(models.llm),
                      "vae": str(models.vae)},
            "context": {"n_threads": args.threads},
            # tiny models: a 1024x1024 step takes ~0.7 s, a 512x512 decode ~5 s (2 cores)
            "width": 1024 if quick else 512, "height": 1024 if quick else 512,
            "decode_width": 512, "decode_height": 512,
            "step_offsets": None if quick else [2.0, 10.0, 30.0], "step_fractions": [0.2, 0.6],
            "decode_offsets": None if quick else [2.0, 10.0], "decode_fractions": [0.3],
            "iso_width": args.width, "iso_height": args.height, "iso_steps": args.steps,
            "iso_images": 2 if quick else 4}
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{family}-control.json"
    path.write_text(json.dumps(spec))
    r = run_child([sys.executable, str(HERE / "control.py"), "--child", str(path)],
                  log=work / f"{family}-control.log")
    return {"family": family, "spec": spec, "peak_rss_mb": r.peak_rss_mb, **r.report}


def markdown(res: dict[str, Any]) -> list[str]:
    s = res["spec"]
    md = [f"### {res['family']}: cancel at {s['width']}x{s['height']}, isolation at "
          f"{s['iso_width']}x{s['iso_height']}", "",
          "| what | cancelled at | outcome | cancel -> return | stopped inside the graph |", "|---|---|---|---|---|"]
    decode = f"VAE decode {s['decode_width']}x{s['decode_height']} ({res['decode_s']} s)"
    for what, key in (("DiT step", "cancel_step"), (decode, "cancel_decode")):
        for row in res[key]:
            md.append(f"| {what} | {row['offset_s']} s | {row['outcome']} | {row['latency_s'] * 1000:.0f} ms | "
                      f"{'yes' if row['stopped_midway'] else 'no'} |")
    md += ["", f"Isolation: {res['in_process_s_per_image']} s/image in-process, {res['isolated_s_per_image']} "
           f"s/image isolated (x{res['isolation_overhead']}), same pixels: {res['isolated_same_pixels']}.", "",
           f"Memory (RSS, MB): start {res['rss_start_mb']}, loaded {res['rss_loaded_mb']}, after generations "
           f"{res['rss_after_generations_mb']}, after close() {res['rss_after_close_mb']}, after a second "
           f"open/generate/close {res['rss_after_second_cycle_mb']}; peak {res['peak_rss_mb']:.0f}.", ""]
    return md


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", type=Path, required=True)
    a = ap.parse_args()
    emit(child(json.loads(a.child.read_text())))
