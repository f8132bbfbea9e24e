"""The FFI layer: cffi declarations, the loaded library, nothing else.

The declarations are plain C kept in ``_decl/stable_diffusion.h`` (upstream's
public API) and ``_native/sdcpp_shim.h`` (our shim). The library is the
``libstable-diffusion`` installed inside the package (found through
importlib.resources), or the one named by ``SDCPP_PY_LIBRARY``.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import cffi

from ._version import ENGINE_COMMIT, __version__
from .errors import LibraryError

LIBRARY_ENV = "SDCPP_PY_LIBRARY"
LIBRARY_NAME = "libstable-diffusion.so"

ffi = cffi.FFI()
for _pkg, _name in (("sdcpp_py._decl", "stable_diffusion.h"), ("sdcpp_py._decl", "ggml_backend.h"),
                   ("sdcpp_py._decl", "libc.h"),
                   ("sdcpp_py._native", "sdcpp_shim.h")):
    ffi.cdef(resources.files(_pkg).joinpath(_name).read_text())


def library_path() -> Path:
    """Where the native library is loaded from (``SDCPP_PY_LIBRARY`` wins)."""
    override = os.environ.get(LIBRARY_ENV)
    if override:
        return Path(override)
    return Path(str(resources.files("sdcpp_py").joinpath("lib").joinpath(LIBRARY_NAME)))


def _load():
    path = library_path()
    if not path.is_file():
        raise LibraryError(
            f"native library not found at {path}. Install the package with pip (it builds the "
            f"library), or point {LIBRARY_ENV} at a libstable-diffusion.so built from this source.")
    try:
        loaded = ffi.dlopen(str(path))
    except OSError as e:
        raise LibraryError(f"cannot load {path}: {e}") from e
    try:
        built_for = ffi.string(loaded.sdcpp_shim_version()).decode()
    except AttributeError:
        raise LibraryError(f"{path} has no sdcpp_py shim: it is not a library built by this package") from None
    commit = ffi.string(loaded.sd_commit()).decode()
    if built_for != __version__ or commit != ENGINE_COMMIT:
        raise LibraryError(
            f"{path} was built for sdcpp_py {built_for} (engine {commit}); this is sdcpp_py "
            f"{__version__} (engine {ENGINE_COMMIT}). Rebuild the package.")
    return loaded


lib = _load()
