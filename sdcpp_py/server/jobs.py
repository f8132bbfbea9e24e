"""Jobs: a bounded queue per served model, one worker thread each, progress events, cancel, TTL.

A job is one request: a prompt, its settings and ``n`` seeds (s, s+1, ...), run as one
encoding (cached across jobs) and ``n`` denoise + decode calls, so its images are those
of ``Pipeline.generate(..., seed=s, batch_count=n)``. Cancelling a running job sets its
token: the engine stops within the current step.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from .. import Preview
from ..errors import Cancelled, InvalidArgumentError, SdcppError
from ..settings import GenerationSettings
from .registry import Served

logger = logging.getLogger("sdcpp_py.server")
FINAL = ("completed", "failed", "cancelled")
STAGES = ("encode", "denoise", "decode")


class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__("the queue is full")
        self.retry_after = retry_after


class Expired(Exception):
    pass


def encode_image(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format={"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt])
    return buf.getvalue()


@dataclass
class Job:
    id: str
    model: str
    settings: GenerationSettings
    output_format: str = "png"
    init_image: Image.Image | None = None
    ref_images: Sequence[Image.Image] = ()
    mask: Image.Image | None = None
    control_image: Image.Image | None = None
    preview: bool = False
    state: str = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    step: int = 0
    steps: int = 0
    image_index: int = 0
    images: list[bytes] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=lambda: {f"{s}_s": 0.0 for s in STAGES})
    error: tuple[int, str] | None = None             # (HTTP status, message)
    cancel_token: threading.Event = field(default_factory=threading.Event)
    events: list[dict[str, Any]] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)
    waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return self.settings.batch_count

    @property
    def result_bytes(self) -> int:
        return sum(len(b) for b in self.images)

    def publish(self, event: dict[str, Any]) -> None:
        with self.changed:
            self.events.append(event)
            self.changed.notify_all()
            for loop, ready in self.waiters:
                loop.call_soon_threadsafe(ready.set)

    async def next_events(self, cursor: int, timeout: float) -> list[dict[str, Any]]:
        """Events after the first ``cursor`` ones, waiting up to ``timeout`` for one on the event
        loop: an idle listener holds no thread."""
        ready = asyncio.Event()
        waiter = (asyncio.get_running_loop(), ready)
        with self.changed:
            if len(self.events) > cursor:
                return self.events[cursor:]
            self.waiters.append(waiter)
        try:
            await asyncio.wait_for(ready.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            with self.changed:
                self.waiters.remove(waiter)
        with self.changed:
            return self.events[cursor:]

    def finish(self, state: str, error: tuple[int, str] | None = None) -> None:
        self.state, self.error, self.finished = state, error, time.time()
        event: dict[str, Any] = {"type": state, "id": self.id}
        if error is not None:
            event["error"] = {"status": error[0], "message": error[1]}
        self.publish(event)

    def describe(self, position: int | None) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id, "object": "job", "model": self.model, "state": self.state,
            "created": int(self.created), "queue_position": position,
            "progress": {"image": self.image_index + (1 if self.state == "running" else 0), "images": self.n,
                         "step": self.step, "steps": self.steps},
            "seeds": self.seeds, "timings": {k: round(v, 3) for k, v in self.timings.items()}}
        if self.started is not None:
            d["started"] = round(self.started, 3)
        if self.finished is not None:
            d["finished"] = round(self.finished, 3)
        if self.error is not None:
            d["error"] = {"status": self.error[0], "message": self.error[1]}
        if self.state == "completed":
            d["result"] = images_response(self)
        return d


def images_response(job: Job) -> dict[str, Any]:
    """OpenAI's ImagesResponse."""
    return {"created": int(job.finished or time.time()),
            "data": [{"b64_json": base64.b64encode(b).decode(), "revised_prompt": None} for b in job.images],
            "output_format": job.output_format,
            "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}}


class Worker(threading.Thread):
    """Runs one served model's jobs, one at a time."""

    def __init__(self, served: Served, manager: JobManager) -> None:
        super().__init__(name=f"sdcpp-server-{served.name}", daemon=True)
        self.served = served
        self.manager = manager
        self.queue: queue.Queue[Job | None] = queue.Queue()

    def run(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            if self.manager.dequeued(job):     # False: cancelled while it waited
                self._run(job)

    def _run(self, job: Job) -> None:
        job.state, job.started = "running", time.time()
        job.publish({"type": "running", "id": job.id})
        pipe = self.served.pipe

        def on_step(step: int, steps: int, seconds: float) -> None:
            job.step, job.steps = step, steps
            if step < 1:              # the engine's "about to start" report
                return
            job.publish({"type": "progress", "image": job.image_index + 1, "images": job.n, "step": step,
                         "steps": steps, "seconds_per_step": round(seconds, 4)})

        preview = Preview(lambda step, im: job.publish({"type": "preview", "image": job.image_index + 1,
                                                        "step": step, "png": _png_b64(im)})) if job.preview else None
        try:
            items = pipe.images(job.settings, init_image=job.init_image, ref_images=job.ref_images, mask=job.mask,
                                control_image=job.control_image, progress=on_step, preview=preview,
                                cancel=job.cancel_token)
            for item in items:
                data = encode_image(item.image, job.output_format)
                job.images.append(data)
                job.seeds.append(item.seed)
                for stage in STAGES:
                    job.timings[f"{stage}_s"] += item.timings[f"{stage}_s"]
                    self.manager.observe(stage, item.timings[f"{stage}_s"])
                job.publish({"type": "image", "image": job.image_index + 1, "images": job.n, "seed": item.seed})
                job.image_index += 1
            job.finish("completed")
        except Cancelled:
            job.finish("cancelled")
        except InvalidArgumentError as e:
            job.finish("failed", (400, str(e)))
        except SdcppError as e:       # the engine's own text names files: the server log has it
            logger.error("job %s failed: %s", job.id, e)
            job.finish("failed", (500, f"the engine failed ({type(e).__name__}); the server's log has the detail"))
        except Exception:             # a bug of ours: the job fails, the worker lives on
            logger.exception("job %s failed", job.id)
            job.finish("failed", (500, "internal error; the server's log has the detail"))
        finally:
            self.manager.finished(job)


def _png_b64(image: np.ndarray) -> str:
    return base64.b64encode(encode_image(Image.fromarray(image), "png")).decode()


class JobManager:
    """All jobs of a server: submit, look up, cancel, expire; counts for /metrics."""

    def __init__(self, models: dict[str, Served], max_queue: int, ttl_s: float, max_results: int = 256,
                 max_result_bytes: int = 1 << 30) -> None:
        self.max_queue = max_queue
        self.ttl_s = ttl_s
        self.max_results, self.max_result_bytes = max_results, max_result_bytes
        self.refused: dict[int, int] = {}         # HTTP status -> requests refused with it
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.expired: OrderedDict[str, None] = OrderedDict()
        self.lock = threading.Lock()
        self.waiting: list[Job] = []              # queued, in order
        self.counts = {s: 0 for s in ("queued", "running", *FINAL)}
        self.stage_seconds = {s: [0.0, 0] for s in STAGES}
        self.job_seconds: list[float] = []
        self.workers = {name: Worker(served, self) for name, served in models.items()}
        for w in self.workers.values():
            w.start()

    def submit(self, model: str, settings: GenerationSettings, **kwargs: Any) -> Job:
        with self.lock:
            self._expire()
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(self._retry_after())
            job = Job(uuid.uuid4().hex, model, settings, **kwargs)
            self.jobs[job.id] = job
            self.waiting.append(job)
            self.counts["queued"] += 1
        job.publish({"type": "queued", "id": job.id})
        self.workers[model].queue.put(job)
        return job

    def _retry_after(self) -> int:
        recent = self.job_seconds[-20:]
        per_job = sum(recent) / len(recent) if recent else 5.0
        return max(1, int(per_job * max(1, len(self.waiting)) / max(1, len(self.workers)) + 0.5))

    def dequeued(self, job: Job) -> bool:
        """A worker takes ``job``: whether to run it (a job cancelled while queued is done)."""
        with self.lock:
            if job not in self.waiting:
                return False
            self.waiting.remove(job)
            self.counts["queued"] -= 1
            self.counts["running"] += 1
            return True

    def finished(self, job: Job) -> None:
        with self.lock:
            self.counts["running"] -= 1
            self.counts[job.state] += 1
            if job.started is not None and job.finished is not None:
                self.job_seconds.append(job.finished - job.started)
                del self.job_seconds[:-100]
            self._expire()

    def observe(self, stage: str, seconds: float) -> None:
        with self.lock:
            self.stage_seconds[stage][0] += seconds
            self.stage_seconds[stage][1] += 1

    def get(self, job_id: str) -> Job:
        with self.lock:
            self._expire()
            job = self.jobs.get(job_id)
            if job is None:
                raise Expired() if job_id in self.expired else KeyError(job_id)
            return job

    def position(self, job: Job) -> int | None:
        with self.lock:
            return self.waiting.index(job) if job in self.waiting else None

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        job.cancel_token.set()
        with self.lock:
            if job in self.waiting:              # never started: cancelled now
                self.waiting.remove(job)
                self.counts["queued"] -= 1
                self.counts["cancelled"] += 1
                job.finish("cancelled")
        return job

    def refuse(self, status: int) -> None:
        with self.lock:
            self.refused[status] = self.refused.get(status, 0) + 1

    def _expire(self) -> None:
        """Finished jobs past the TTL go, and the oldest while more than ``max_results`` are kept
        or their images hold more than ``max_result_bytes``."""
        now = time.time()
        done = [j for j in self.jobs.values() if j.state in FINAL and j.finished is not None]
        done.sort(key=lambda j: j.finished or 0.0)
        held = sum(j.result_bytes for j in done)
        for i, job in enumerate(done):
            if (now - (job.finished or now) <= self.ttl_s and len(done) - i <= self.max_results
                    and held <= self.max_result_bytes):
                break
            held -= job.result_bytes
            del self.jobs[job.id]
            self.expired[job.id] = None
        while len(self.expired) > 10000:
            self.expired.popitem(last=False)

    def metrics(self) -> str:
        with self.lock:
            lines = ["# HELP sdcpp_queue_length Jobs waiting to run.", "# TYPE sdcpp_queue_length gauge",
                     f"sdcpp_queue_length {len(self.waiting)}",
                     "# HELP sdcpp_jobs Jobs by state (queued and running: now; others: since start).",
                     "# TYPE sdcpp_jobs gauge"]
            lines += [f'sdcpp_jobs{{state="{s}"}} {n}' for s, n in self.counts.items()]
            lines += ["# HELP sdcpp_refused_total Requests refused, by HTTP status.",
                      "# TYPE sdcpp_refused_total counter"]
            lines += [f'sdcpp_refused_total{{status="{s}"}} {n}' for s, n in sorted(self.refused.items())]
            lines += ["# HELP sdcpp_stage_seconds Seconds spent per stage.", "# TYPE sdcpp_stage_seconds summary"]
            for stage, (total, count) in self.stage_seconds.items():
                lines += [f'sdcpp_stage_seconds_sum{{stage="{stage}"}} {total:.6f}',
                          f'sdcpp_stage_seconds_count{{stage="{stage}"}} {count}']
        return "\n".join(lines) + "\n"

    def close(self) -> None:
        for job in list(self.jobs.values()):
            if job.state not in FINAL:
                job.cancel_token.set()
        for w in self.workers.values():
            w.queue.put(None)
        for w in self.workers.values():
            w.join(timeout=60)
