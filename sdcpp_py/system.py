"""What the loaded engine is: versions, library path, CPU features it was built with."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import backends
from ._ffi import ffi, lib, library_path
from ._version import __version__
from .settings import default_threads


def _features(text: str) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for item in text.split("|"):
        key, sep, value = item.strip().partition("=")
        if sep:
            out[key.strip()] = value.strip() == "1"
    return out


def system_info() -> dict[str, Any]:
    """Versions, the library in use, thread defaults and the CPU features compiled in."""
    variant = backends.load()
    raw = ffi.string(lib.sd_get_system_info()).decode().replace("System Info:", "")
    return {
        "sdcpp_py": __version__,
        "engine_version": ffi.string(lib.sd_version()).decode(),
        "engine_commit": ffi.string(lib.sd_commit()).decode(),
        "library": str(library_path()),
        "physical_cores": int(lib.sd_get_num_physical_cores()),
        "default_threads": default_threads(),
        "sd_cli": str(sd_cli_path() or ""),
        "cpu_variant": variant,
        "cpu_variants_installed": backends.available_cpu_variants(),
        "cpu_features": _features(raw),
        "devices": [d.__dict__ for d in backends.devices()],
        "raw": raw.strip(),
    }


def sd_cli_path() -> Path | None:
    """Upstream's sd-cli built from the same source (``SDCPP_PY_BUILD_CLI=ON``), if installed.

    ``SDCPP_PY_SD_CLI`` names another one.
    """
    override = os.environ.get("SDCPP_PY_SD_CLI")
    candidate = Path(override) if override else library_path().parent / "sd-cli"
    return candidate if candidate.is_file() and os.access(candidate, os.X_OK) else None
