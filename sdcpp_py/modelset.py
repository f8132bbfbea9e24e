"""A model set (files, context settings, preset) for every face that names models: grid
files, the server's config and command line, the CLI. Its identity is each file's content
identity, never a name or folder; ``Pipeline.open_set`` opens one, sharing a text encoder.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidArgumentError
from .fileid import identity
from .presets import get_preset
from .settings import ContextSettings

MODEL_FILES = ("model", "diffusion_model", "llm", "vae", "taesd", "controlnet")


@dataclass(frozen=True)
class ModelSet:
    """The files of one resident Pipeline and its ContextSettings keywords."""

    name: str
    files: dict[str, str]
    settings: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None      # generation defaults (None: the family's)

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {**self.files, **self.settings, **({"preset": self.preset} if self.preset else {})}

    @property
    def identity(self) -> dict[str, Any]:
        """What a row id depends on: the name, the files' contents, the settings (not n_threads)."""
        return {"name": self.name, "files": {k: content(v) for k, v in sorted(self.files.items())},
                "settings": {k: v for k, v in sorted(self.settings.items()) if k != "n_threads"},
                "preset": self.preset}


def content(path: str) -> str:
    """A file's content identity; a file not there (yet) by its name (it cannot run anyway)."""
    p = Path(path)
    return identity(p) if p.is_file() else f"missing:{p.name}"


def model_set(name: str, spec: Mapping[str, Any], base: Path | None = None, where: str = "model set") -> ModelSet:
    """A ModelSet from ``{"diffusion_model": ..., "llm": ..., "vae": ..., "settings": {...}, "preset": ...}``."""
    what = f"{where} {name!r}" if name else where
    if not isinstance(spec, Mapping):
        raise InvalidArgumentError(f"{what} must be a mapping of files (and settings)")
    unknown = sorted(set(spec) - set(MODEL_FILES) - {"settings", "preset", "name"})
    if unknown:
        raise InvalidArgumentError(f"{what}: unknown keys {unknown} "
                                   f"(files: {', '.join(MODEL_FILES)}; settings: ContextSettings keywords)")
    files = {k: absolute(spec[k], base) for k in MODEL_FILES if spec.get(k)}
    if "model" not in files and "diffusion_model" not in files:
        raise InvalidArgumentError(f"{what} needs model or diffusion_model")
    settings = spec.get("settings") or {}
    if not isinstance(settings, Mapping):
        raise InvalidArgumentError(f"{what}: settings must map ContextSettings keywords to values")
    try:
        ContextSettings(**settings)
    except TypeError as e:
        raise InvalidArgumentError(f"{what}: {e}") from None
    preset = spec.get("preset")
    if preset is not None:
        get_preset(str(preset))       # a clear error now, not on every worker
    return ModelSet(name, files, dict(settings), None if preset is None else str(preset))


def absolute(v: Any, base: Path | None) -> str:
    """A path relative to ``base`` (else this process's folder), made absolute here, so that every
    worker opens the same file."""
    if not isinstance(v, (str, Path)):
        raise InvalidArgumentError(f"a file path must be a string, not {type(v).__name__}")
    p = Path(v).expanduser()
    return str((p if p.is_absolute() else (base or Path.cwd()) / p).resolve())
