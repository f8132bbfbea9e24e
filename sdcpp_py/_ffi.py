"""The FFI layer: cffi declarations, the loaded library, nothing else.

The declarations are plain C kept in ``_decl/stable_diffusion.h`` (upstream's
public API) and ``_native/sdcpp_shim.h`` (our shim). The library is the
``libstable-diffusion`` installed inside the package (found through
importlib.resources), or the one named by ``SDCPP_PY_LIBRARY``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, cast

import cffi

from ._lib_types import CData, Lib
from ._version import ENGINE_COMMIT, __version__
from .errors import LibraryError

LIBRARY_ENV = "SDCPP_PY_LIBRARY"
LIBRARY_NAME = "libstable-diffusion.so"

# Any on purpose: cdata (structs, arrays, pointers) is dynamic, and the cffi stubs type every
# cdata as one class without fields, so each struct access would need a cast. ``lib`` is typed.
ffi: Any = cffi.FFI()
for _pkg, _name in (("sdcpp_py._decl", "stable_diffusion.h"), ("sdcpp_py._decl", "ggml_backend.h"),
                   ("sdcpp_py._decl", "libc.h"),
                   ("sdcpp_py._native", "sdcpp_shim.h")):
    ffi.cdef(resources.files(_pkg).joinpath(_name).read_text())


def callback(decl: str, onerror: Callable[..., object] | None = None) -> Callable[[Callable[..., None]], CData]:
    """``ffi.callback(decl)`` as a typed decorator: the decorated name holds the C function pointer."""
    decorator: Callable[[Callable[..., None]], CData] = ffi.callback(decl, onerror=onerror)
    return decorator


def string(p: CData) -> str:
    """The text of a ``char*`` the library returned (UTF-8)."""
    text: str = ffi.string(p).decode()
    return text


def library_path() -> Path:
    """Where the native library is loaded from (``SDCPP_PY_LIBRARY`` wins)."""
    override = os.environ.get(LIBRARY_ENV)
    if override:
        return Path(override)
    return Path(str(resources.files("sdcpp_py").joinpath("lib").joinpath(LIBRARY_NAME)))


def _load() -> Lib:
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
    return cast(Lib, loaded)


lib: Lib = _load()
"""The native library; its functions' types are described by ``_lib_types.Lib``."""
