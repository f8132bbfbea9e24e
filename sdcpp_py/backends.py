"""ggml backends: the CPU build that runs on this host, the devices, the one a context uses.

The package carries several builds of ggml's CPU backend (``libggml-cpu-<variant>.so``)
and, when built with ``SDCPP_PY_VULKAN=ON``, the Vulkan backend. They are loaded once per
process, before the first context: ggml scores each CPU module against the host's
CPUID and loads the best one, so an older CPU gets a build it can run (never an illegal
instruction) and a newer one gets its wider vector units. ``SDCPP_PY_CPU_VARIANT``
(or ``load(cpu_variant=...)``) forces one module, e.g. to compare them.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from ._ffi import ffi, lib, library_path
from .errors import BackendError
from .weights import CpuKernels

logger = logging.getLogger("sdcpp_py")

CPU_VARIANT_ENV = "SDCPP_PY_CPU_VARIANT"
BACKENDS = ("auto", "cpu", "vulkan")

# ggml's x86 CPU variants and the instruction sets each is compiled for (ggml/src/CMakeLists.txt).
_BASE = ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2")
X86_VARIANTS: dict[str, tuple[str, ...]] = {
    "x64": (), "sse42": ("SSE42",), "sandybridge": ("SSE42", "AVX"), "ivybridge": ("SSE42", "AVX", "F16C"),
    "piledriver": ("SSE42", "AVX", "F16C", "FMA"), "haswell": _BASE,
    "skylakex": _BASE + ("AVX512",), "cannonlake": _BASE + ("AVX512", "AVX512_VBMI"),
    "cascadelake": _BASE + ("AVX512", "AVX512_VNNI"),
    "icelake": _BASE + ("AVX512", "AVX512_VBMI", "AVX512_VNNI"),
    "cooperlake": _BASE + ("AVX512", "AVX512_VNNI", "AVX512_BF16"),
    "zen4": _BASE + ("AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16"),
    "alderlake": _BASE + ("AVX_VNNI",),
    "sapphirerapids": _BASE + ("AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AMX_TILE", "AMX_INT8"),
}


@dataclass(frozen=True)
class Device:
    name: str            # what a context is given: "CPU", "Vulkan0", ...
    description: str
    type: str            # "cpu", "gpu", "igpu", "accel"
    memory_total: int
    memory_free: int


_lock = threading.Lock()
_loaded: str | None = None  # the CPU variant in use once loaded ("builtin" for a static build)


def _libdir() -> Path:
    return library_path().parent


def available_cpu_variants() -> list[str]:
    """The CPU modules installed with the package."""
    prefix = "libggml-cpu-"
    return sorted(p.name[len(prefix):-3] for p in _libdir().glob(prefix + "*.so"))


def load(cpu_variant: str | None = None) -> str:
    """Load the backend modules once; returns the CPU variant in use.

    ``cpu_variant`` (or ``$SDCPP_PY_CPU_VARIANT``) forces a module; otherwise ggml
    picks the best one the host supports.
    """
    global _loaded
    with _lock:
        wanted = cpu_variant or os.environ.get(CPU_VARIANT_ENV) or None
        if _loaded is not None:
            if wanted and wanted != _loaded:
                raise BackendError(f"the {_loaded} CPU backend is already loaded in this process; "
                                   f"choose {wanted!r} before the first context")
            return _loaded
        libdir = _libdir()
        variants = available_cpu_variants()
        if not variants and not (libdir / "libggml-cpu.so").exists():
            _loaded = "builtin"  # a static build: the CPU backend is part of the library
            return _loaded
        if wanted:
            if wanted not in variants:
                raise BackendError(f"no {wanted!r} CPU module in {libdir}; available: {', '.join(variants)}")
            if lib.ggml_backend_load(str(libdir / f"libggml-cpu-{wanted}.so").encode()) == ffi.NULL:
                raise BackendError(f"this processor lacks instructions the {wanted!r} CPU build needs "
                                   f"({', '.join(X86_VARIANTS.get(wanted, ())) or 'see ggml'})")
            for other in sorted(libdir.glob("libggml-*.so")):
                if not other.name.startswith(("libggml-cpu", "libggml-base")) and other.name != "libggml.so":
                    lib.ggml_backend_load(str(other).encode())
        else:
            lib.ggml_backend_load_all_from_path(str(libdir).encode())
        if lib.ggml_backend_reg_by_name(b"CPU") == ffi.NULL:
            raise BackendError(f"no CPU module in {libdir} runs on this processor "
                               f"(installed: {', '.join(variants) or 'none'})")
        _loaded = wanted or _identify(cpu_features())
        logger.info("CPU backend: %s", _loaded)
        return _loaded


def cpu_features() -> dict[str, str]:
    """What the loaded CPU backend reports (instruction sets compiled in, OpenMP, ...)."""
    reg = lib.ggml_backend_reg_by_name(b"CPU")
    if reg == ffi.NULL:
        return {}
    fn = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_get_features")
    if fn == ffi.NULL:
        return {}
    out = {}
    f = ffi.cast("ggml_backend_get_features_t", fn)(reg)
    while f.name != ffi.NULL:
        out[ffi.string(f.name).decode()] = ffi.string(f.value).decode()
        f += 1
    return out


def reported_features(variant: str) -> set[str]:
    """The instruction sets a variant's module reports about itself (it lists neither SSE4.2
    nor AMX_TILE, which its build implies)."""
    return set(X86_VARIANTS.get(variant, ())) - {"SSE42", "AMX_TILE"}


def _identify(features: dict[str, str]) -> str:
    """The richest variant whose instruction sets the loaded CPU module reports."""
    on = {k for k, v in features.items() if v not in ("0", "")}
    matches = [name for name in X86_VARIANTS if reported_features(name) <= on]
    return max(matches, key=lambda n: len(X86_VARIANTS[n])) if matches else "unknown"


def cpu_kernels() -> CpuKernels:
    """The loaded CPU module's kernels for weights (loads the backends): what the weight policy plans with."""
    variant = load()
    on = frozenset(k for k, v in cpu_features().items() if v not in ("0", ""))
    names = ffi.string(lib.sdcpp_cpu_weight_buffer_types()).decode()
    return CpuKernels(variant, on, tuple(n for n in names.split(",") if n))


def cpu_variant() -> str:
    return load()


def devices() -> list[Device]:
    """The devices contexts can run on (after loading the modules)."""
    load()
    kinds = {lib.GGML_BACKEND_DEVICE_TYPE_CPU: "cpu", lib.GGML_BACKEND_DEVICE_TYPE_GPU: "gpu",
             lib.GGML_BACKEND_DEVICE_TYPE_IGPU: "igpu", lib.GGML_BACKEND_DEVICE_TYPE_ACCEL: "accel"}
    out = []
    free, total = ffi.new("size_t*"), ffi.new("size_t*")
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        lib.ggml_backend_dev_memory(dev, free, total)
        out.append(Device(ffi.string(lib.ggml_backend_dev_name(dev)).decode(),
                          ffi.string(lib.ggml_backend_dev_description(dev)).decode(),
                          kinds.get(lib.ggml_backend_dev_type(dev), "other"), int(total[0]), int(free[0])))
    return out


def resolve_device(backend: str, device: int | str | None = None) -> str | None:
    """The ggml device name a context should use (None: the engine's own choice)."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    names = [d.name for d in devices()]
    if isinstance(device, str):
        if device not in names:
            raise BackendError(f"no device {device!r}; devices: {', '.join(names)}")
        return device
    if backend == "auto":
        return None if device is None else resolve_device("vulkan", device)
    if backend == "cpu":
        return "CPU"
    vulkan = [n for n in names if n.startswith("Vulkan")]
    if not vulkan:
        raise BackendError("no Vulkan device: the package needs SDCPP_PY_VULKAN=ON at build time and a Vulkan "
                           "driver at run time (software: mesa-vulkan-drivers with GGML_VK_VISIBLE_DEVICES=0)")
    index = 0 if device is None else device
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(vulkan):
        raise BackendError(f"no Vulkan device {device!r}; there are {len(vulkan)}")
    return vulkan[index]


def default_device() -> str:
    """The device the engine picks without a preference: a GPU, else an iGPU, else the CPU."""
    found = devices()
    for kind in ("gpu", "igpu", "cpu"):
        for d in found:
            if d.type == kind:
                return d.name
    return "CPU"
