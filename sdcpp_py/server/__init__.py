"""``sdcpp-py serve``: resident models behind OpenAI's images API, jobs with progress and cancel.

Needs the ``server`` extra (FastAPI + uvicorn: the ASGI stack the Python field uses, with
request validation from pydantic and server-sent events from Starlette, so that none of
HTTP is ours to get wrong). :func:`serve` loads the models, binds the socket (127.0.0.1 by
default; port 0 picks a free one, printed) and runs uvicorn until stopped, or until
``max_requests`` / ``max_seconds`` when given (tests).
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
from typing import Any

from ..modelset import ModelSet, model_set
from ..settings import SAMPLERS
from .config import Limits, ServerConfig, load_config
from .registry import Registry

logger = logging.getLogger("sdcpp_py.server")

__all__ = ["Limits", "ModelSet", "model_set", "ServerConfig", "Registry", "load_config", "create_app", "serve"]


def create_app(registry: Registry, config: ServerConfig) -> Any:
    from .app import create_app as make

    return make(registry, config)


def warm(registry: Registry) -> None:
    """Ask each model's engine defaults once (sampler -> scheduler), so requests never wait for them."""
    for served in registry.models.values():
        for sampler in (None, *SAMPLERS):
            try:
                served.pipe.settings_for("", sampler=sampler, width=64, height=64)
            except Exception:            # a sampler this model refuses: asked again per request
                pass


def serve(config: ServerConfig, *, host: str = "127.0.0.1", port: int = 8080, max_requests: int | None = None,
          max_seconds: float | None = None, log_level: str = "warning") -> int:
    import uvicorn

    registry = Registry(list(config.models))
    try:
        warm(registry)
        app = create_app(registry, config)
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        bound = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(
            app, log_level=log_level, limit_max_requests=max_requests, timeout_graceful_shutdown=10,
            limit_concurrency=config.limits.max_connections, timeout_keep_alive=5, h11_max_incomplete_event_size=65536))
        if max_seconds is not None:
            timer = threading.Timer(max_seconds, lambda: setattr(server, "should_exit", True))
            timer.daemon = True
            timer.start()
        print(f"sdcpp-py serve: {', '.join(registry.models)} on http://{host}:{bound}", file=sys.stderr, flush=True)
        server.run(sockets=[sock])
    finally:
        registry.close()
    return 0
