"""Server suite: what HTTP costs on top of a generation, and requests per minute under load.

    python benchmarks/run.py --suites server --knob-families z-image-turbo,flux2-klein
    python benchmarks/serving.py --child spec.json               # one measured process

In one child process per family: the server's own resident pipeline generates N images
directly (the in-process baseline), then the same N requests go through a real uvicorn on
127.0.0.1 one at a time (latency per request), then 2N requests from 4 clients at once
(requests per minute, p50/p95 latency), then a bad upload's 400 alone and beside 200 idle
event-stream listeners (a job waiting behind a long one), then prompt encodings of growing
length with the default token limit (512) and without it. Upstream's sd-server is not in the
pinned engine (its examples/ holds only the CLI), so there is no sd-server row.
"""

from __future__ import annotations

import argparse
import base64
import json
import resource
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import emit, ratio, run_script  # noqa: E402

PROMPT = "a lighthouse on a cliff at dawn, volumetric light"


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import httpx
    import uvicorn

    from sdcpp_py.server import Limits, ModelSet, Registry, ServerConfig, create_app, warm

    entry = ModelSet("model", spec["files"], settings=spec.get("context", {}))
    t = time.perf_counter()
    registry = Registry([entry])
    load_s = time.perf_counter() - t
    warm(registry)
    pipe = registry.models["model"].pipe
    w, h, steps, n = spec["width"], spec["height"], spec["steps"], spec["images"]
    pipe.generate(PROMPT, width=w, height=h, steps=steps, seed=0)           # warm-up at this size
    direct = []
    for i in range(n):
        t = time.perf_counter()
        pipe.generate(PROMPT, width=w, height=h, steps=steps, seed=100 + i)
        direct.append(time.perf_counter() - t)

    app = create_app(registry, ServerConfig((entry,), Limits(max_queue=64)))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"

    def request(seed: int) -> float:
        t = time.perf_counter()
        r = httpx.post(f"{url}/v1/images/generations", timeout=3600,
                       json={"prompt": PROMPT, "size": f"{w}x{h}", "steps": steps, "seed": seed})
        r.raise_for_status()
        base64.b64decode(r.json()["data"][0]["b64_json"])
        return time.perf_counter() - t

    sequential = [request(100 + i) for i in range(n)]
    t = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(request, range(200, 200 + 2 * n)))
    wall = time.perf_counter() - t
    listeners = idle_listeners(url, w, h, spec.get("listeners", 200))
    server.should_exit = True
    thread.join(60)
    prompts = long_prompts(pipe)
    registry.close()
    q = statistics.quantiles(concurrent, n=20) if len(concurrent) >= 2 else concurrent * 19
    return {"load_s": round(load_s, 2), "direct_s_per_image": round(statistics.mean(direct), 3),
            "http_s_per_request": round(statistics.mean(sequential), 3),
            "http_overhead": ratio(statistics.mean(sequential), statistics.mean(direct)),
            "requests_per_minute_4_clients": round(60 * len(concurrent) / wall, 2),
            "direct_images_per_minute": round(60 / statistics.mean(direct), 2),
            "latency_p50_s": round(statistics.median(concurrent), 3), "latency_p95_s": round(q[18], 3),
            **listeners, "prompts": prompts}


def idle_listeners(url: str, w: int, h: int, count: int) -> dict[str, Any]:
    """A bad upload's 400 while a long job runs, without and with ``count`` idle event streams open
    (on a job that waits behind it): the streams must hold no thread of the server."""
    import httpx

    def bad_upload() -> float:
        t = time.perf_counter()
        r = httpx.post(f"{url}/v1/images/edits", files={"image": ("x.png", b"not a png", "image/png")},
                       data={"prompt": "x"}, timeout=60)
        assert r.status_code == 400, r.text
        return time.perf_counter() - t

    running = httpx.post(f"{url}/v1/jobs", json={"prompt": PROMPT, "size": "1024x1024", "steps": 50}).json()["id"]
    waiting = httpx.post(f"{url}/v1/jobs", json={"prompt": PROMPT, "size": f"{w}x{h}", "steps": 1}).json()["id"]
    alone = statistics.median(bad_upload() for _ in range(9))      # beside the same running generation
    opened, stop = [], threading.Event()

    def listen() -> None:
        with httpx.Client(timeout=600) as c, c.stream("GET", f"{url}/v1/jobs/{waiting}/events") as r:
            opened.append(r.status_code)
            for _ in r.iter_lines():
                if stop.is_set():
                    return
    threads = [threading.Thread(target=listen, daemon=True) for _ in range(count)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while len(opened) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    busy = statistics.median(bad_upload() for _ in range(9))
    still = httpx.get(f"{url}/v1/jobs/{waiting}").json()["state"] == "queued"     # the streams were idle throughout
    stop.set()
    for job in (running, waiting):
        httpx.delete(f"{url}/v1/jobs/{job}")
    for t in threads:
        t.join(60)
    return {"listeners": len(opened) if still else 0, "bad_upload_ms_alone": round(alone * 1000, 1),
            "bad_upload_ms_with_listeners": round(busy * 1000, 1), "listener_slowdown": ratio(busy, alone)}


def long_prompts(pipe: Any) -> list[dict[str, Any]]:
    """Encode seconds and peak RSS for prompts of growing length, at the default limit (512 tokens:
    cut) and without one. CJK text: about one token per character."""
    import dataclasses

    rows = []
    base = "山间小路，晨雾，松树，远处的灯塔，油画风格。"
    for chars in (200, 2000, 8000):
        text = (base * (chars // len(base) + 1))[:chars]
        for limit in ("512", "none"):
            if limit == "none" and chars > 2000:
                continue                      # minutes and tens of GB at full size: the point of the limit
            original = pipe.settings
            if limit == "none":
                pipe.settings = dataclasses.replace(original, max_prompt_tokens=1 << 20)
            try:
                t = time.perf_counter()
                cond = pipe.encode(text, use_cache=False)
                seconds = time.perf_counter() - t
            finally:
                pipe.settings = original
            rows.append({"chars": chars, "limit": limit, "tokens": pipe.engine.count_tokens(text),
                         "encoded_tokens": int(cond.context.shape[-2]), "encode_s": round(seconds, 3),
                         "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)})
    return rows


def run(family: str, models: Any, args: Any, work: Path) -> dict[str, Any]:
    spec = {"files": {"diffusion_model": str(models.diffusion_model), "llm": str(models.llm),
                      "vae": str(models.vae)},
            "context": {"n_threads": args.threads}, "width": args.width, "height": args.height,
            "steps": args.steps, "images": 2 if args.quick else 4}
    r = run_script("serving.py", spec, work, f"{family}-server")
    return {"family": family, "spec": spec, "peak_rss_mb": r.peak_rss_mb, **r.report}


def markdown(res: dict[str, Any]) -> list[str]:
    s = res["spec"]
    return [f"### {res['family']}: {s['width']}x{s['height']}, {s['steps']} steps, {s['images']} images", "",
            "| path | s per image | images per minute | p50 / p95 s |", "|---|---|---|---|",
            f"| Pipeline.generate, in the server's process | {res['direct_s_per_image']} | "
            f"{res['direct_images_per_minute']} | |",
            f"| HTTP, one client | {res['http_s_per_request']} (x{res['http_overhead']}) | "
            f"{round(60 / res['http_s_per_request'], 2)} | |",
            f"| HTTP, 4 clients | | {res['requests_per_minute_4_clients']} | {res['latency_p50_s']} / "
            f"{res['latency_p95_s']} |",
            f"| a bad upload's 400, alone / beside {res['listeners']} idle event streams | "
            f"{res['bad_upload_ms_alone']} / {res['bad_upload_ms_with_listeners']} ms "
            f"(x{res['listener_slowdown']}) | | |", "",
            "| prompt (CJK characters) | token limit | tokens | encoded | encode s | peak RSS MB (so far) |",
            "|---|---|---|---|---|---|",
            *[f"| {p['chars']} | {p['limit']} | {p['tokens']} | {p['encoded_tokens']} | {p['encode_s']} | "
              f"{p['peak_rss_mb']} |" for p in res["prompts"]], "",
            "sd-server: not in the pinned engine (examples/ has only the CLI); no row.", ""]


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", type=Path, required=True)
    a = ap.parse_args()
    emit(child(json.loads(a.child.read_text())))
