"""What a server serves and its limits: model sets from the command line or a config file.

A config file (JSON) holds ``{"models": [{"name": ..., "diffusion_model": ..., "llm": ...,
"vae": ..., "preset": ..., "settings": {ContextSettings keywords}}, ...], "limits": {...}}``;
model sets whose ``llm`` is the same file share one text encoder in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError
from ..modelset import ModelSet, model_set


@dataclass(frozen=True)
class Limits:
    """Caps on what one request may ask for (each configurable)."""

    max_body_bytes: int = 32 << 20       # request body (uploads included)
    max_n: int = 8                       # images per request
    max_pixels: int = 1536 * 1536        # width x height of a generated image
    max_steps: int = 50
    max_upload_pixels: int = 4096 * 4096  # decoded size of an uploaded image
    max_uploads: int = 4                 # images per edit request
    max_queue: int = 16                  # queued (not yet running) jobs, all models together
    result_ttl_s: float = 600.0          # finished jobs are kept this long, then 410
    max_results: int = 256               # finished jobs kept at most (the oldest go first: 410)
    max_result_bytes: int = 1 << 30      # their images' bytes at most
    max_prompt_chars: int = 20000
    max_connections: int = 512           # open connections (uvicorn's limit_concurrency: 503 beyond)
    body_timeout_s: float = 60.0         # to read a request's body (408 beyond)

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            kind = float if f.type in ("float", float) else int
            if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int) or not v > 0:
                raise InvalidArgumentError(f"limits: {f.name} must be a positive {kind.__name__}, got {v!r}")

    @classmethod
    def from_dict(cls, d: Any) -> Limits:
        if not isinstance(d, dict):
            raise InvalidArgumentError("limits must be an object of numbers")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InvalidArgumentError(f"limits: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        return cls(**d)


@dataclass(frozen=True)
class ServerConfig:
    models: tuple[ModelSet, ...]
    limits: Limits = Limits()
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    lora_dir: Path | None = None        # the folder whose files requests name in "loras"


def load_config(path: Path) -> tuple[list[ModelSet], Limits]:
    """Model entries and limits from a JSON config file (relative paths: from the file's folder)."""
    try:
        root = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgumentError(f"--config {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise InvalidArgumentError(f"--config {path}: bad JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(root, dict) or not isinstance(root.get("models"), list) or not root["models"]:
        raise InvalidArgumentError(f"--config {path}: needs a non-empty \"models\" list")
    entries = []
    for i, item in enumerate(root["models"]):
        name = item.get("name") if isinstance(item, dict) else None
        entries.append(model_set(str(name or ""), item, path.parent, where=f"--config {path}: models[{i}]"))
    limits = Limits.from_dict(root.get("limits") or {})
    return entries, limits
