"""Native callbacks: the engine's log lines and per-call progress.

stable-diffusion.cpp keeps one process-wide log callback and one progress
callback. The log callback is installed once and forwards every line to
``logging.getLogger("sdcpp_py")`` (removed at exit). The progress callback is
installed only for the duration of one call (``progress_scope``, on the engine
thread) and reset in ``finally``; an exception raised by the user's callback stops
the call (the engine's abort flag), is kept, and is re-raised once the native
call has returned and its results are freed.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
from collections.abc import Iterator
from types import TracebackType

import numpy as np

from ._ffi import callback, ffi, lib
from ._lib_types import CData, CStruct
from .settings import Preview, ProgressFn, TqdmProgress

logger = logging.getLogger("sdcpp_py")
logger.addHandler(logging.NullHandler())
native_logger = logging.getLogger("sdcpp_py.native")

_LEVELS = {
    lib.SD_LOG_DEBUG: logging.DEBUG,
    lib.SD_LOG_INFO: logging.INFO,
    lib.SD_LOG_WARN: logging.WARNING,
    lib.SD_LOG_ERROR: logging.ERROR,
}



@callback("void(enum sd_log_level_t, const char*, void*)")
def _on_log(level: int, text: CData, _data: CData) -> None:
    try:
        py_level = _LEVELS.get(level, logging.INFO)
        if py_level >= logging.ERROR and lib.sdcpp_cancel_requested():
            py_level = logging.INFO   # the failures a cancel causes on its way out are not errors
        if native_logger.isEnabledFor(py_level) or _captures:
            line = ffi.string(text).decode("utf-8", "replace").rstrip()
            if native_logger.isEnabledFor(py_level):
                native_logger.log(py_level, "%s", line)
            for log in _captures:       # what a call reports (LoRAs applied, steps a cache skipped), any level
                log.lines.append((py_level, line))
    except Exception:  # a log line must never unwind into C
        pass


ggml_logger = logging.getLogger("sdcpp_py.ggml")
_GGML_LEVELS = {lib.GGML_LOG_LEVEL_DEBUG: logging.DEBUG, lib.GGML_LOG_LEVEL_INFO: logging.INFO,
                lib.GGML_LOG_LEVEL_WARN: logging.WARNING, lib.GGML_LOG_LEVEL_ERROR: logging.ERROR}


@callback("void(enum ggml_log_level, const char*, void*)")
def _on_ggml_log(level: int, text: CData, _data: CData) -> None:
    try:
        py_level = _GGML_LEVELS.get(level, logging.DEBUG)
        if ggml_logger.isEnabledFor(py_level):
            line = ffi.string(text).decode("utf-8", "replace").rstrip()
            if line:
                ggml_logger.log(py_level, "%s", line)
    except Exception:
        pass


def _install_log() -> None:
    lib.sd_set_log_callback(_on_log, ffi.NULL)
    lib.ggml_log_set(_on_ggml_log, ffi.NULL)


def _remove_log() -> None:
    lib.sd_set_log_callback(ffi.NULL, ffi.NULL)
    lib.ggml_log_set(ffi.NULL, ffi.NULL)


_install_log()
atexit.register(_remove_log)


class _ProgressState:
    current: _ProgressState | None = None     # the state of the call running now

    def __init__(self, fn: ProgressFn) -> None:
        self.fn = fn
        self.error: BaseException | None = None

    def raise_error(self) -> None:
        """Re-raise what the user's callback raised during the call, if anything."""
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def _progress_error(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    """An exception that escaped ``_on_progress`` itself (a KeyboardInterrupt at its first line)."""
    _stop_call(exc)


def _stop_call(error: BaseException) -> None:
    lib.sdcpp_cancel()     # the running call stops within the graph it computes
    if _ProgressState.current is not None and _ProgressState.current.error is None:
        _ProgressState.current.error = error


@callback("void(int, int, float, void*)", onerror=_progress_error)
def _on_progress(step: int, steps: int, seconds: float, data: CData) -> None:
    state: _ProgressState = ffi.from_handle(data)
    if state.error is not None:
        return
    try:
        state.fn(step, steps, seconds)
    except BaseException as e:  # the call stops; re-raised after the native call returns
        _stop_call(e)


def _ignore_progress(step: int, steps: int, seconds: float) -> None:
    pass


@contextlib.contextmanager
def progress_scope(fn: ProgressFn | bool | None) -> Iterator[_ProgressState]:
    """Route the engine's progress to ``fn`` for the duration of the block.

    Without ``fn`` a silent callback is installed anyway (the engine would
    otherwise print progress bars on stdout). Runs on the engine thread. An
    exception the callback raised stops the call and is kept in the yielded
    state's ``error``: the caller frees what the native call returned, then
    raises it (``state.raise_error()``).
    """
    if fn is True:
        fn = TqdmProgress()
    elif fn is False or fn is None:
        fn = _ignore_progress
    elif not callable(fn):
        raise TypeError("progress must be a callable(step, steps, seconds), True for a tqdm bar, or None")
    state = _ProgressState(fn)
    handle = ffi.new_handle(state)
    _ProgressState.current = state
    lib.sd_set_progress_callback(_on_progress, handle)
    try:
        yield state
    finally:
        lib.sd_set_progress_callback(ffi.NULL, ffi.NULL)
        _ProgressState.current = None
        if isinstance(fn, TqdmProgress):
            fn.close()


def _preview_error(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    _stop_call(exc)


@callback("void(int, int, sd_image_t*, bool, void*)", onerror=_preview_error)
def _on_preview(step: int, frame_count: int, frames: CStruct, is_noisy: bool, data: CData) -> None:
    preview: Preview = ffi.from_handle(data)
    current = _ProgressState.current
    if frame_count < 1 or frames == ffi.NULL or (current is not None and current.error is not None):
        return
    if step % preview.interval:      # the pinned engine stores the interval but previews every step
        return
    try:
        im = frames[0]
        shape = (im.height, im.width, im.channel)
        array = np.frombuffer(ffi.buffer(im.data, shape[0] * shape[1] * shape[2]), np.uint8).reshape(shape).copy()
        preview.fn(step, array)
    except BaseException as e:  # the call stops; re-raised after the native call returns
        _stop_call(e)


@contextlib.contextmanager
def preview_scope(preview: Preview | None) -> Iterator[None]:
    """Route the engine's preview images to ``preview.fn`` for the block (engine thread);
    inside a ``progress_scope``, whose state keeps an exception the preview raised."""
    if preview is None:
        yield
        return
    if not isinstance(preview, Preview):
        raise TypeError("preview must be a sdcpp_py.Preview")
    handle = ffi.new_handle(preview)
    lib.sd_set_preview_callback(_on_preview, lib.str_to_preview(preview.mode.encode()), preview.interval,
                                not preview.noisy, preview.noisy, handle)
    try:
        yield
    finally:
        lib.sd_set_preview_callback(ffi.NULL, lib.PREVIEW_NONE, 1, True, False, ffi.NULL)


class NativeLog(logging.Handler):
    """Collects the engine's log lines while a native call runs: ``records`` as logged (the logger's
    level applies), ``lines`` all of them, whatever the level."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def errors(self) -> str:
        lines = [r.getMessage() for r in self.records if r.levelno >= logging.ERROR]
        return "\n".join(lines[-5:])


class capture:
    """Context manager collecting native log lines during one call."""

    def __enter__(self) -> NativeLog:
        self.handler = NativeLog()
        logging.getLogger("sdcpp_py.native").addHandler(self.handler)
        _captures.append(self.handler)
        return self.handler

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("sdcpp_py.native").removeHandler(self.handler)
        _captures.remove(self.handler)


_captures: list[NativeLog] = []     # the captures open now (engine thread: one call at a time)
