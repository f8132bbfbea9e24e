"""The HTTP server against a real uvicorn on 127.0.0.1 (port 0), with the tiny models: the
official openai client, jobs and server-sent events, cancel, auth, limits, a bounded load test."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from sdcpp_py.server import Limits, ModelSet, Registry, ServerConfig, create_app, warm  # noqa: E402

KEY = "test-key-123"
LIMITS = Limits(max_body_bytes=2 << 20, max_n=4, max_pixels=512 * 512, max_steps=60, max_queue=3,
                result_ttl_s=3.0)


@pytest.fixture(scope="module")
def server(tiny_sets):
    entries = [ModelSet(name, {"diffusion_model": str(m.diffusion_model), "llm": str(m.llm), "vae": str(m.vae)},
                          settings={"n_threads": 2}) for name, m in tiny_sets.items()]
    registry = Registry(entries)
    warm(registry)
    app = create_app(registry, ServerConfig(tuple(entries), LIMITS, KEY))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    yield url
    srv.should_exit = True
    thread.join(30)
    registry.close()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


@pytest.fixture
def oai(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("model", ["z-image-turbo", "flux2-klein"])
def test_openai_generate_equals_pipeline(oai, pipelines, model):
    r = oai.images.generate(model=model, prompt="a lighthouse at dawn", n=2, size="64x48",
                            response_format="b64_json", extra_body={"seed": 5, "steps": 2})
    assert len(r.data) == 2
    expect = pipelines[model].generate("a lighthouse at dawn", width=64, height=48, steps=2, seed=5, batch_count=2)
    for item, want in zip(r.data, expect.arrays, strict=True):
        assert np.array_equal(decode(item.b64_json), want)


def test_openai_edit_references_and_img2img(oai, pipelines):
    source = pipelines["z-image-turbo"].generate("a red boat", width=64, height=64, steps=1, seed=1).image
    data = png_bytes(source)
    r = oai.images.edit(model="flux2-klein", image=("boat.png", data, "image/png"), prompt="make it blue",
                        size="64x64", extra_body={"seed": 9, "steps": 2})
    want = pipelines["flux2-klein"].generate("make it blue", width=64, height=64, steps=2, seed=9,
                                             ref_images=[source]).arrays[0]
    assert np.array_equal(decode(r.data[0].b64_json), want)
    r = oai.images.edit(model="z-image-turbo", image=("boat.png", data, "image/png"), prompt="a boat at night",
                        extra_body={"seed": 3, "steps": 4, "strength": 0.5})
    want = pipelines["z-image-turbo"].generate("a boat at night", width=64, height=64, steps=4, seed=3,
                                               init_image=source, strength=0.5).arrays[0]
    assert np.array_equal(decode(r.data[0].b64_json), want)


def test_edit_with_a_photo_sized_reference(oai, pipelines):
    """A reference of any size is resized as sd-cli's auto-resize does (bounded tokens)."""
    from sdcpp_py._images import fit_reference

    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 100, 3), dtype=np.uint8))
    r = oai.images.edit(model="flux2-klein", image=("p.png", png_bytes(photo), "image/png"), prompt="x",
                        size="64x64", extra_body={"seed": 2, "steps": 1})
    want = pipelines["flux2-klein"].generate("x", width=64, height=64, steps=1, seed=2,
                                             ref_images=[fit_reference(photo, 64, 64)]).arrays[0]
    assert fit_reference(photo, 64, 64).size == (64, 48)
    assert np.array_equal(decode(r.data[0].b64_json), want)


def test_negative_prompt_is_capped(client):
    r = client.post("/v1/images/generations", json={"prompt": "x", "negative_prompt": "n" * 20001, "size": "64x64"})
    assert r.status_code == 413 and r.json()["error"]["param"] == "negative_prompt"


def test_health_models_metrics(client, server):
    assert httpx.get(f"{server}/health").status_code == 200          # no key needed
    models = client.get("/v1/models").json()
    names = {m["id"]: m for m in models["data"]}
    assert set(names) == {"z-image-turbo", "flux2-klein"}
    assert names["flux2-klein"]["shares_encoder_with"] == "z-image-turbo"    # one Qwen3 in memory
    text = client.get("/metrics").text
    assert "sdcpp_queue_length " in text and 'sdcpp_jobs{state="completed"}' in text
    assert 'sdcpp_stage_seconds_count{stage="denoise"}' in text


def test_auth(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(f"{server}/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.images.generate(prompt="x", size="64x64")


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "x", "n": "many"}, 422, "n"),
    ({"prompt": "x", "colour": "red"}, 422, "colour"),
    ({"n": 1}, 422, "prompt"),
    ({"prompt": "x", "size": "64by64"}, 400, "size"),
    ({"prompt": "x", "size": "1024x1024"}, 400, "size"),
    ({"prompt": "x", "size": "64x64", "n": 5}, 400, "n"),
    ({"prompt": "x", "size": "64x64", "steps": 61}, 400, "steps"),
    ({"prompt": "x", "size": "60x64"}, 400, None),
    ({"prompt": "x", "model": "sd15"}, 404, "model"),
    ({"prompt": "x", "response_format": "url"}, 400, "response_format"),
])
def test_bad_requests_in_openai_shape(client, body, status, param):
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and (param is None or param in (error["param"] or error["message"]))


def test_body_and_upload_limits(client):
    r = client.post("/v1/images/generations", content=b"{" + b" " * (3 << 20) + b"}",
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    bomb = png_bytes(Image.new("RGB", (5000, 5000)))          # small file, 25 MP decoded
    r = client.post("/v1/images/edits", data={"prompt": "x"}, files={"image": ("b.png", bomb, "image/png")})
    assert r.status_code == 413 and "pixels" in r.json()["error"]["message"]
    r = client.post("/v1/images/edits", data={"prompt": "x"}, files={"image": ("b.png", b"not a png", "image/png")})
    assert r.status_code == 400
    r = client.post("/v1/images/edits", data={"prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"


def _events(client, job_id: str) -> list[dict]:
    events = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append(json.loads(line[6:]))
                assert events[-1]["type"] == kind
    return events


def test_job_events_progress_per_step_and_result(client, pipelines):
    r = client.post("/v1/jobs", json={"prompt": "a fox", "model": "flux2-klein", "size": "64x64", "steps": 3,
                                      "seed": 4, "n": 2, "preview": True})
    assert r.status_code == 202
    job = r.json()
    assert job["state"] in ("queued", "running") and job["object"] == "job"
    events = _events(client, job["id"])
    progress = [(e["image"], e["step"]) for e in events if e["type"] == "progress"]
    assert progress == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    assert sum(e["type"] == "preview" for e in events) == 6
    assert [e["seed"] for e in events if e["type"] == "image"] == [4, 5]
    final = events[-1]
    assert final["type"] == "completed" and len(final["result"]["data"]) == 2
    state = client.get(f"/v1/jobs/{job['id']}").json()
    assert state["state"] == "completed" and state["seeds"] == [4, 5] and state["progress"]["step"] == 3
    assert state["timings"]["denoise_s"] > 0
    want = pipelines["flux2-klein"].generate("a fox", width=64, height=64, steps=3, seed=4, batch_count=2).arrays
    assert np.array_equal(decode(final["result"]["data"][1]["b64_json"]), want[1])
    time.sleep(LIMITS.result_ttl_s + 0.5)
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 410
    assert client.get("/v1/jobs/nosuchjob").status_code == 404


def _long_job(client) -> str:
    r = client.post("/v1/jobs", json={"prompt": "a long walk", "model": "z-image-turbo", "size": "512x512",
                                      "steps": 60, "seed": 1})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def test_delete_cancels_mid_step_and_queue_bounds(client):
    running = _long_job(client)
    deadline = time.monotonic() + 60
    while client.get(f"/v1/jobs/{running}").json()["progress"]["step"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    queued = [_long_job(client) for _ in range(LIMITS.max_queue)]
    full = client.post("/v1/jobs", json={"prompt": "one more", "size": "64x64"})
    assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1
    assert client.get(f"/v1/jobs/{queued[0]}").json()["queue_position"] == 0
    for job_id in queued:
        assert client.delete(f"/v1/jobs/{job_id}").json()["state"] == "cancelled"
    start = time.monotonic()
    client.delete(f"/v1/jobs/{running}")
    while (state := client.get(f"/v1/jobs/{running}").json())["state"] == "running":
        assert time.monotonic() - start < 10
        time.sleep(0.05)
    assert state["state"] == "cancelled" and state["progress"]["step"] < 60
    r = client.post("/v1/images/generations", json={"prompt": "still here", "size": "64x64", "steps": 1})
    assert r.status_code == 200


def test_client_disconnect_cancels_the_request(client, server):
    before = client.get("/metrics").text
    cancelled = int(re.search(r'sdcpp_jobs\{state="cancelled"\} (\d+)', before).group(1))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/images/generations", headers={"Authorization": f"Bearer {KEY}"}, timeout=2,
                   json={"prompt": "gone", "model": "z-image-turbo", "size": "512x512", "steps": 60})
    deadline = time.monotonic() + 15
    while int(re.search(r'sdcpp_jobs\{state="cancelled"\} (\d+)', client.get("/metrics").text).group(1)) == cancelled:
        assert time.monotonic() < deadline, "the abandoned request kept running"
        time.sleep(0.2)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1]) / 1024


def _completed(client) -> int:
    return int(re.search(r'sdcpp_jobs\{state="completed"\} (\d+)', client.get("/metrics").text).group(1))


def test_load_nothing_lost(server, client):
    """40 requests from 8 clients that retry on 429 (Retry-After): every request gets its image,
    each exactly once (the server completed 40 jobs), the same bytes when asked again, and the
    server's memory returns to where it was."""
    def one(i: int) -> tuple[int, bytes, int]:
        refused = 0
        with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
            model = ["z-image-turbo", "flux2-klein"][i % 2]
            while True:
                r = c.post("/v1/images/generations", json={"prompt": f"tile {i % 5}", "size": "64x64", "steps": 1,
                                                            "seed": 1000 + i, "model": model})
                if r.status_code != 429:
                    assert r.status_code == 200, r.text
                    return i, base64.b64decode(r.json()["data"][0]["b64_json"]), refused
                refused += 1
                assert refused < 200
                time.sleep(min(float(r.headers["Retry-After"]), 0.5))

    one(0)
    base, done = _rss_mb(), _completed(client)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(40)))
    assert sorted(i for i, _, _ in results) == list(range(40))
    assert sum(refused for _, _, refused in results) > 0          # the bound on the queue held
    assert _completed(client) - done == 40
    images = {i: data for i, data, _ in results}
    for i in (3, 17, 38):
        assert one(i)[1] == images[i]
    assert _rss_mb() - base < 300


def test_serve_command_stops_by_itself(tiny_sets, tmp_path):
    m = tiny_sets["z-image-turbo"]
    proc = subprocess.Popen([sys.executable, "-m", "sdcpp_py", "serve", "--diffusion-model", str(m.diffusion_model),
                             "--llm", str(m.llm), "--vae", str(m.vae), "-t", "2", "--port", "0",
                             "--max-requests", "3", "--max-seconds", "120"],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={k: v for k, v in os.environ.items() if k != "SDCPP_PY_API_KEY"})
    try:
        line = proc.stderr.readline()
        match = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        assert match, line + proc.stderr.read()
        url = match.group(1)
        assert httpx.get(f"{url}/health").json()["models"] == ["z-image-turbo"]
        r = httpx.post(f"{url}/v1/images/generations", json={"prompt": "x", "size": "64x64", "steps": 1},
                       timeout=120)
        assert r.status_code == 200 and decode(r.json()["data"][0]["b64_json"]).shape == (64, 64, 3)
        httpx.get(f"{url}/v1/models")
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_config_file(tiny_sets, tmp_path):
    from sdcpp_py import InvalidArgumentError
    from sdcpp_py.server import load_config

    m = tiny_sets["flux2-klein"]
    cfg = tmp_path / "models.json"
    cfg.write_text(json.dumps({"models": [{"name": "klein", "diffusion_model": str(m.diffusion_model),
                                           "llm": m.llm.name, "vae": str(m.vae), "settings": {"n_threads": 2}}],
                               "limits": {"max_n": 2}}))
    (tmp_path / m.llm.name).symlink_to(m.llm)
    entries, limits = load_config(cfg)
    assert entries[0].name == "klein" and entries[0].files["llm"] == str((tmp_path / m.llm.name).resolve())
    assert limits.max_n == 2 and limits.max_queue == Limits().max_queue
    for bad, needle in (({"models": []}, "models"), ({"models": [{"llm": "x"}]}, "diffusion_model"),
                        ({"models": [{"diffusion_model": "x", "lora": "y"}]}, "lora"),
                        ({"models": [{"diffusion_model": "x"}], "limits": {"max_cats": 1}}, "max_cats")):
        cfg.write_text(json.dumps(bad))
        with pytest.raises(InvalidArgumentError, match=needle):
            load_config(cfg)
