"""The ASGI app: OpenAI's images API, jobs with server-sent events, health, models, metrics.

Replies and errors take OpenAI's shapes (``{"error": {"message", "type", "param",
"code"}}``), so the official ``openai`` client works unchanged. Every route but
``/health`` needs ``Authorization: Bearer KEY`` when the server has a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import json
import logging
import re
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from starlette.datastructures import UploadFile as StarletteUpload
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._images import mask_from_alpha, prepare, size_of
from ..errors import InvalidArgumentError
from ..families import FLUX2_DEV, FLUX2_KLEIN
from ..settings import GenerationSettings, lora_pairs, parse_request, parse_size, request_fields
from .config import Limits, ServerConfig
from .jobs import FINAL, Expired, Job, JobManager, QueueFull, images_response
from .registry import Registry, Served

logger = logging.getLogger("sdcpp_py.server")
_REF_FAMILIES = (FLUX2_KLEIN, FLUX2_DEV)
_LORA_NAME = re.compile(r"[\w][\w.+ -]{0,127}")      # a file name: no separator, no leading dot
_LORA_SUFFIXES = (".safetensors", ".gguf")
KEEPALIVE_S = 15.0


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


_PATH = re.compile(r"(?:/[\w.+-]+)+/([\w.+-]+)")


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error shape; a server path in the message becomes its file name."""
    public = _PATH.sub(r"\1", message)[:1000]
    return JSONResponse({"error": {"message": public, "type": kind, "param": param, "code": None}},
                        status_code=status, headers=headers)


class OpenAIImageRequest(BaseModel):
    """OpenAI's image generation body; :func:`request_model` adds the request's own fields."""

    model_config = ConfigDict(extra="forbid")
    prompt: str
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png", "jpeg", "webp"] = "png"
    # OpenAI's fields that do not apply to these models: accepted, not used
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    background: str | None = None
    moderation: str | None = None
    output_compression: int | None = None
    partial_images: int | None = None
    stream: bool | None = None
    preview: bool = False          # jobs: preview images in the event stream


# request fields that OpenAI's body sets its own way (prompt; size for width/height; n for batch_count)
_OPENAI_SPELLED = ("prompt", "width", "height", "batch_count")


def request_model() -> type[BaseModel]:
    """OpenAI's body plus every field of the request (seed, steps, cfg_scale, ...), all optional."""
    ours: dict[str, Any] = {name: (kind | None, None) for name, kind in request_fields().items()
                            if name not in _OPENAI_SPELLED}
    return create_model("ImageRequest", __base__=OpenAIImageRequest, **ours)


class BodyLimit:
    """413 for request bodies over ``limit`` bytes (declared or streamed), 408 for a body not read
    within ``timeout`` seconds (a client trickling bytes holds a connection, not the server)."""

    def __init__(self, app: ASGIApp, limit: int, timeout: float, refuse: Callable[[int], None]) -> None:
        self.app, self.limit, self.timeout, self.refuse = app, limit, timeout, refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or len(declared) > 18 or int(declared) > self.limit):
            self.refuse(413)
            await _error(413, f"request body over {self.limit} bytes")(scope, receive, send)
            return
        seen, received = 0, False
        deadline = asyncio.get_running_loop().time() + self.timeout

        async def limited() -> Message:
            nonlocal seen, received
            if received:                      # the body is in: later receives wait for a disconnect
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                raise HTTPException(408, f"request body not received within {self.timeout:g} s") from None
            received = message["type"] != "http.request" or not message.get("more_body", False)
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, f"request body over {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


class BearerAuth:
    """401 unless ``Authorization: Bearer KEY`` (constant-time compare); ``/health`` is open.
    Pure ASGI (not BaseHTTPMiddleware, which hides a client's disconnect from the endpoint)."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") != "/health":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = _error(401, "invalid or missing API key (Authorization: Bearer ...)",
                                  "authentication_error")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(registry: Registry, config: ServerConfig) -> FastAPI:
    limits = config.limits
    body_model = request_model()
    manager = JobManager(registry.models, limits.max_queue, limits.result_ttl_s, limits.max_results,
                         limits.max_result_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(manager.close)     # running jobs cancelled, workers joined

    app = FastAPI(title="sdcpp-py", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.manager = manager
    app.state.registry = registry

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        manager.refuse(e.status)
        return _error(e.status, e.message, e.kind, e.param, e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        manager.refuse(e.status_code)
        return _error(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error",
                      headers=dict(e.headers) if e.headers else None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        manager.refuse(422)
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        message = str(first.get("msg", "invalid"))[:300]
        return _error(422, f"{where}: {message}" if where else message, param=where or None)

    @app.exception_handler(InvalidArgumentError)
    async def invalid_argument(_: Request, e: InvalidArgumentError) -> JSONResponse:
        manager.refuse(400)
        return _error(400, str(e)[:500])

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> JSONResponse:     # a bug of ours: the log has it
        return _error(500, "internal error; the server's log has the detail", "server_error")

    if config.api_key:
        app.add_middleware(BearerAuth, key=config.api_key)
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes, timeout=limits.body_timeout_s, refuse=manager.refuse)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": list(registry.models)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": m.created, "owned_by": "sdcpp-py", "family": m.pipe.family,
             "shares_encoder_with": m.shares_encoder_with} for m in registry.models.values()]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(manager.metrics(), media_type="text/plain; version=0.0.4")

    async def _body(request: Request) -> dict[str, Any]:
        try:
            return body_model.model_validate_json(await request.body()).model_dump()
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None

    @app.post("/v1/images/generations")
    async def generations(request: Request) -> Response:
        job = _submit(await _body(request), [])
        return await _wait(job, request)

    @app.post("/v1/images/edits")
    async def edits(request: Request) -> Response:
        body, images, mask, control = await _edit_form(request)
        job = await asyncio.to_thread(_submit, body, images, mask, control)   # resizing: off the event loop
        return await _wait(job, request)

    @app.post("/v1/jobs", status_code=202)
    async def create_job(request: Request) -> dict[str, Any]:
        job = _submit(await _body(request), [])
        return job.describe(manager.position(job))

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str) -> dict[str, Any]:
        job = _job(job_id)
        return job.describe(manager.position(job))

    @app.delete("/v1/jobs/{job_id}")
    async def delete_job(job_id: str) -> dict[str, Any]:
        try:
            job = manager.cancel(job_id)
        except KeyError:
            raise ApiError(404, f"no job {job_id}") from None
        except Expired:
            raise ApiError(410, f"job {job_id} expired") from None
        return job.describe(manager.position(job))

    @app.get("/v1/jobs/{job_id}/events")
    async def job_events(job_id: str) -> StreamingResponse:
        job = _job(job_id)

        async def stream() -> AsyncIterator[str]:
            """Events as they come; idle, a comment every KEEPALIVE_S (a gone client fails that
            send and Starlette ends the stream: no polling, no thread)."""
            cursor = 0
            while True:
                events = await job.next_events(cursor, KEEPALIVE_S)
                if not events:
                    yield ": keep-alive\n\n"
                for event in events:
                    cursor += 1
                    if event["type"] == "completed":
                        event = {**event, "result": images_response(job)}
                    yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
                    if event["type"] in FINAL:
                        return

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _job(job_id: str) -> Job:
        try:
            return manager.get(job_id)
        except KeyError:
            raise ApiError(404, f"no job {job_id}") from None
        except Expired:
            raise ApiError(410, f"job {job_id} expired (results are kept {limits.result_ttl_s:g} s)") from None

    def _submit(body: dict[str, Any], images: list[Image.Image], mask: Image.Image | None = None,
                control: Image.Image | None = None) -> Job:
        served = registry.get(body["model"])
        if served is None:
            raise ApiError(404, f"no model {body['model']!r} (GET /v1/models)", param="model")
        if body["response_format"] == "url":
            raise ApiError(400, "response_format 'url' is not supported: use b64_json", param="response_format")
        body["loras"] = _loras(body.get("loras") or (), config.lora_dir)
        if control is not None and served.pipe.controlnet is None:
            raise ApiError(400, f"model {served.name!r} has no ControlNet (its model set's controlnet file)",
                           param="control_image")
        settings, init_image, refs, mask = _settings(served, body, images or ([control] if control else []), limits,
                                                     mask, control is not None and not images)
        if control is not None and control.size != (settings.width, settings.height):
            control = control.resize((settings.width, settings.height), Image.Resampling.LANCZOS)
        try:
            return manager.submit(served.name, settings, output_format=body["output_format"], init_image=init_image,
                                  ref_images=refs, mask=mask, control_image=control, preview=body["preview"])
        except QueueFull as e:
            raise ApiError(429, "the queue is full, retry later", "rate_limit_error",
                           headers={"Retry-After": str(e.retry_after)}) from None

    async def _wait(job: Job, request: Request) -> Response:
        """A synchronous request: the job's images, or its error; a client that goes away cancels it."""
        while job.state not in FINAL:
            await job.next_events(len(job.events), 0.25)
            if job.state not in FINAL and await request.is_disconnected():
                logger.info("client went away: cancelling job %s", job.id)
                manager.cancel(job.id)
                return Response(status_code=499)
        if job.state == "completed":
            return JSONResponse(images_response(job))
        if job.state == "cancelled":
            return _error(409, "the request was cancelled", "request_cancelled")
        status, message = job.error or (500, "failed")
        if status < 500:
            manager.refuse(status)
        return _error(status, message, "invalid_request_error" if status < 500 else "server_error")

    async def _edit_form(request: Request
                         ) -> tuple[dict[str, Any], list[Image.Image], Image.Image | None, Image.Image | None]:
        try:
            form = await request.form(max_files=limits.max_uploads + 1, max_fields=64)
        except HTTPException:
            raise
        except Exception as e:
            raise ApiError(400, f"unreadable multipart form: {str(e)[:200]}") from None
        uploads = [v for k, v in form.multi_items() if k in ("image", "image[]") and isinstance(v, StarletteUpload)]
        mask_upload = form.get("mask")
        if mask_upload is not None and not isinstance(mask_upload, StarletteUpload):
            raise ApiError(400, "mask must be an image upload (PNG with alpha: transparent pixels are edited)",
                           param="mask")
        control_upload = form.get("control_image")
        if control_upload is not None and not isinstance(control_upload, StarletteUpload):
            raise ApiError(400, "control_image must be an image upload (the ControlNet's guide)", param="control_image")
        if not uploads and control_upload is None:
            raise ApiError(400, "give at least one image (image or image[], or a control_image)", param="image")
        if len(uploads) > limits.max_uploads:
            raise ApiError(400, f"at most {limits.max_uploads} images", param="image")
        fields: dict[str, Any] = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        ours = {k: v for k, v in fields.items() if k in request_fields() and k not in _OPENAI_SPELLED}
        try:
            try:       # the request's fields from text by their types; OpenAI's by pydantic's lax parsing
                values = {**fields, **parse_request(ours, where="form", text=True)}
                body = body_model.model_validate(values).model_dump()
            except InvalidArgumentError as e:
                raise ApiError(422, str(e)) from None
            except ValidationError as e:
                raise RequestValidationError(e.errors()) from None
            images = [await _read_image(u, limits) for u in uploads]
            mask = await _read_image(mask_upload, limits, "RGBA") if mask_upload is not None else None
            control = await _read_image(control_upload, limits) if control_upload is not None else None
            return body, images, mask, control
        finally:
            await form.close()

    return app


async def _read_image(upload: StarletteUpload, limits: Limits, mode: str = "RGB") -> Image.Image:
    data = await upload.read()
    return await asyncio.to_thread(_decode_upload, data, upload.filename, limits, mode)


def _decode_upload(data: bytes, filename: str | None, limits: Limits, mode: str = "RGB") -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            if im.width * im.height > limits.max_upload_pixels:
                raise ApiError(413, f"image {filename}: {im.width}x{im.height} is over "
                                    f"{limits.max_upload_pixels} pixels", param="image")
            im.load()
            if mode == "RGBA" and "A" not in im.getbands() and "transparency" not in im.info:
                raise ApiError(400, f"mask {filename}: no alpha channel (OpenAI's mask: transparent pixels are "
                                    "edited)", param="mask")
            return im.convert(mode)
    except ApiError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ApiError(400, f"image {filename}: not a readable image ({e})", param="image") from None


def _loras(named: Any, folder: Path | None) -> tuple[tuple[str, float], ...]:
    """A request's LoRAs, named by file name (with or without its suffix) in the server's LoRA folder:
    names from clients, never paths."""
    try:
        pairs = lora_pairs(named)
    except (TypeError, ValueError) as e:
        raise ApiError(400, f"loras: {e}", param="loras") from None
    if pairs and folder is None:
        raise ApiError(400, "this server has no LoRA folder (sdcpp-py serve --lora-model-dir DIR)", param="loras")
    out = []
    for name, weight in pairs:
        if not _LORA_NAME.fullmatch(name):
            raise ApiError(400, f"loras: {name[:60]!r} is not a file name of the server's LoRA folder", param="loras")
        assert folder is not None
        found = [p for p in (folder / name, *(folder / f"{name}{s}" for s in _LORA_SUFFIXES)) if p.is_file()]
        if not found:
            raise ApiError(400, f"loras: no LoRA named {name!r} on this server", param="loras")
        out.append((str(found[0]), weight))
    return tuple(out)


def _size(text: str | None, images: list[Image.Image], limits: Limits) -> tuple[int | None, int | None]:
    if text is None or text == "auto":
        return size_of(images[0], limits.max_pixels) if images else (None, None)
    try:
        return parse_size(text)
    except InvalidArgumentError as e:
        raise ApiError(400, f"{e} (or 'auto')", param="size") from None


def _settings(served: Served, body: dict[str, Any], images: list[Image.Image], limits: Limits,
              mask: Image.Image | None = None, sizing_only: bool = False
              ) -> tuple[GenerationSettings, Image.Image | None, list[Image.Image], Image.Image | None]:
    """The request from the body: OpenAI's fields and ours; the images as init image or references
    (with a mask, the first is the init image to inpaint: OpenAI's mask, transparent pixels edited).
    They are prepared, as every face's are, by the pipeline's staged loop. ``sizing_only``: the image
    (a control image) only sets the size."""
    for name in ("prompt", "negative_prompt"):
        if len(body.get(name) or "") > limits.max_prompt_chars:
            raise ApiError(413, f"{name} over {limits.max_prompt_chars} characters", param=name)
    if body["n"] > limits.max_n:
        raise ApiError(400, f"n is at most {limits.max_n}", param="n")
    if body.get("steps") is not None and body["steps"] > limits.max_steps:
        raise ApiError(400, f"steps is at most {limits.max_steps}", param="steps")
    width, height = _size(body["size"], images, limits)
    if sizing_only:
        images = []
    init: Image.Image | None = None
    refs: list[Image.Image] = []
    pil_mask = None
    if mask is not None:
        if mask.size != images[0].size:
            raise ApiError(400, f"the mask is {mask.width}x{mask.height}, the image {images[0].width}x"
                                f"{images[0].height}: they must be the same size", param="mask")
        pil_mask = mask_from_alpha(mask)
    if images:
        if served.pipe.family in _REF_FAMILIES and body.get("strength") is None and mask is None:
            refs = images                   # FLUX.2: the images are references to edit from
        else:
            init = images[0]                # img2img
    values = {k: v for k, v in body.items() if k in request_fields() and k not in _OPENAI_SPELLED}
    if init is None:
        values.pop("strength", None)
    try:
        s = served.pipe.settings_for(body["prompt"], width=width, height=height, batch_count=body["n"], **values)
        init, refs, pil_mask = prepare(s.width, s.height, init, refs, s.auto_resize_ref_image, pil_mask)
    except (InvalidArgumentError, TypeError) as e:
        raise ApiError(400, str(e)) from None
    width, height = s.output_size                               # a hires pass's, when there is one
    if width * height > limits.max_pixels:
        raise ApiError(400, f"{width}x{height} is over this server's {limits.max_pixels} pixels", param="size")
    return s, init, refs, pil_mask
