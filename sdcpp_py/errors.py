"""The exception hierarchy: everything the package raises on purpose is an SdcppError."""

from __future__ import annotations


class SdcppError(Exception):
    """Base class of sdcpp_py's errors."""


class LibraryError(SdcppError):
    """The native library is missing, does not load, or does not match this package."""


class ModelLoadError(SdcppError):
    """A model could not be loaded (missing, corrupt or incompatible files)."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """A model file does not exist."""


class CorruptModelError(ModelLoadError):
    """A model file is not a readable GGUF or safetensors file."""


class IncompatibleModelError(ModelLoadError):
    """Model files do not fit together (wrong VAE for the family, encoder width, ...)."""


class InvalidArgumentError(SdcppError, ValueError):
    """A generation or context setting is out of range."""


class GenerationError(SdcppError):
    """The engine failed to produce an image."""


class ClosedError(SdcppError, RuntimeError):
    """The object was used after close()."""


class ReentrantCallError(SdcppError, RuntimeError):
    """An engine call was made from inside another one (e.g. from a progress callback)."""


class Cancelled(SdcppError):
    """The call was stopped by ``Pipeline.cancel()``, a cancel token, or a progress callback's exception."""


class EngineCrashed(SdcppError):
    """The engine's worker process died (isolated mode); the next call starts a new one."""


class BackendError(SdcppError):
    """No usable backend or device for the request."""
