"""What a server serves and its limits: model sets from the command line or a config file.

A config file (JSON) holds ``{"models": [{"name": ..., "diffusion_model": ..., "llm": ...,
"vae": ..., "preset": ..., "settings": {ContextSettings keywords}}, ...], "limits": {...}}``;
model sets whose ``llm`` is the same file share one text encoder in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError

MODEL_FILE_KEYS = ("model", "diffusion_model", "llm", "vae", "taesd")


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
    max_prompt_chars: int = 20000

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Limits:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InvalidArgumentError(f"limits: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        return cls(**d)


@dataclass(frozen=True)
class ModelEntry:
    """One model set: its name at /v1/models, its files, preset and context settings."""

    name: str
    files: dict[str, str]
    preset: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerConfig:
    models: tuple[ModelEntry, ...]
    limits: Limits = Limits()
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()


def load_config(path: Path) -> tuple[list[ModelEntry], Limits]:
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
        if not isinstance(item, dict):
            raise InvalidArgumentError(f"--config {path}: models[{i}] is not an object")
        unknown = sorted(set(item) - {"name", "preset", "settings", *MODEL_FILE_KEYS})
        if unknown:
            raise InvalidArgumentError(f"--config {path}: models[{i}]: unknown key {unknown[0]!r}")
        files = {k: str((path.parent / item[k]).resolve()) for k in MODEL_FILE_KEYS if item.get(k)}
        if "model" not in files and "diffusion_model" not in files:
            raise InvalidArgumentError(f"--config {path}: models[{i}] needs diffusion_model (or model)")
        settings = item.get("settings") or {}
        if not isinstance(settings, dict):
            raise InvalidArgumentError(f"--config {path}: models[{i}].settings is not an object")
        entries.append(ModelEntry(str(item.get("name") or ""), files, item.get("preset"), settings))
    limits = Limits.from_dict(root.get("limits") or {})
    return entries, limits
