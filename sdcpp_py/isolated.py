"""Crash isolation at the Engine seam: with ``Pipeline(..., isolate=True)`` the Pipeline stays
here and drives an :class:`IsolatedEngine`, whose Engine lives in a worker process serving
its methods over a socket (arrays and images by shared memory, the rest by pickle). An
engine abort raises :class:`EngineCrashed`; the next call starts a new worker and opens the
context again. Cancel, tokens, Ctrl-C and progress work as in-process (SIGUSR1 cancels the
worker's engine; the worker ignores SIGINT, so a terminal's Ctrl-C reaches the parent only).
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from ._engine_thread import CancelToken, check_token
from ._ffi import lib
from ._images import ImageLike
from .engine import Engine, Parts
from .errors import Cancelled, ClosedError, EngineCrashed, InvalidArgumentError, SdcppError
from .settings import ContextSettings, GenerationSettings, Preview, ProgressFn, TqdmProgress

logger = logging.getLogger("sdcpp_py")
INLINE_BYTES = 1 << 16          # smaller arrays travel inside the pickle
LOG_TAIL_LINES = 20
_POLL_S = 0.05


# -- shared memory codec ----------------------------------------------------------------------
class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, blocks: list[SharedMemory]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.blocks = blocks

    def persistent_id(self, obj: Any) -> tuple[Any, ...] | None:
        if isinstance(obj, Image.Image):
            a = np.asarray(obj)
            return ("image", self._put(a), a.shape, a.dtype.str, obj.mode)
        if isinstance(obj, np.ndarray) and obj.dtype.kind in "biuf" and obj.nbytes >= INLINE_BYTES:
            return ("array", self._put(obj), obj.shape, obj.dtype.str, None)
        return None

    def _put(self, a: np.ndarray) -> str:
        block = SharedMemory(create=True, size=max(a.nbytes, 1))
        np.ndarray(a.shape, a.dtype, buffer=block.buf)[...] = a
        self.blocks.append(block)
        return block.name


class _Unpickler(pickle.Unpickler):
    def persistent_load(self, pid: tuple[Any, ...]) -> Any:
        kind, name, shape, dtype, mode = pid
        block = _attach(name)
        try:
            a = np.ndarray(shape, np.dtype(dtype), buffer=block.buf).copy()
        finally:
            block.close()
        if kind == "image":
            image = Image.fromarray(a)
            return image if image.mode == mode else image.convert(mode)
        return a


def _attach(name: str) -> SharedMemory:
    """Open the sender's block without this process's resource tracker claiming it (the
    sender unlinks it; Python before 3.13 registers attached blocks too)."""
    try:
        return SharedMemory(name=name, track=False)     # type: ignore[call-arg]  # Python 3.13+
    except TypeError:
        block = SharedMemory(name=name)
        resource_tracker.unregister(block._name, "shared_memory")   # type: ignore[attr-defined]
        return block


def _dumps(obj: Any, blocks: list[SharedMemory]) -> bytes:
    f = io.BytesIO()
    _Pickler(f, blocks).dump(obj)
    return f.getvalue()


def _loads(data: bytes) -> Any:
    return _Unpickler(io.BytesIO(data)).load()


def _free(blocks: list[SharedMemory]) -> None:
    """The sender's blocks, once the receiver has copied them out."""
    for b in blocks:
        b.close()
        b.unlink()
    blocks.clear()


# -- the worker process -------------------------------------------------------------------------
# The worker's command: this process's import path exactly (``-m`` or a bare ``-c`` would put
# the working directory first, and a source tree there would shadow the installed package).
_CHILD = ("import json, sys; sys.path[:] = json.loads(sys.argv[3]); "
          "from sdcpp_py.isolated import _child_main; _child_main()")


def _child_main() -> None:
    """The worker, talking over the socket FD of ``sys.argv[1]``, logging to ``sys.argv[2]``.

    A plain subprocess rather than multiprocessing's spawn, which would import the
    user's main module again (scripts without a ``__main__`` guard would recurse)."""
    conn = Connection(int(sys.argv[1]))
    _serve(conn, _loads(conn.recv_bytes()), sys.argv[2])


# the Engine methods a worker serves
_CALLS = frozenset({"open", "close", "loaded", "weight_bytes", "all_buffers", "release", "default_method",
                    "count_tokens", "generate", "encode", "denoise", "decode", "encode_image", "load_controlnet",
                    "controlnet"})


def _serve(conn: Connection, kwargs: dict[str, Any], log_path: str) -> None:
    """The worker's main: one Engine, calls until "close" or the parent goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 2)                           # the engine's asserts print on fd 2 before they abort
    sys.stderr = os.fdopen(2, "w", buffering=1)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger("sdcpp_py")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    blocks: list[SharedMemory] = []

    def send(message: tuple[Any, ...]) -> None:
        conn.send_bytes(_dumps(message, blocks))

    engine = Engine(**kwargs)
    signal.signal(signal.SIGUSR1, lambda *_: engine.cancel())
    send(("ok", None))
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            engine.close()
            return
        _free(blocks)                        # the parent copied the previous reply out
        kind, name, args, call_kwargs = _loads(data)
        if kind == "abort":
            lib.sdcpp_test_abort()
        try:
            if name not in _CALLS:
                raise InvalidArgumentError(f"the engine worker serves no {name!r}")
            if call_kwargs.pop("_progress", False):
                call_kwargs["progress"] = lambda step, steps, secs: send(("progress", step, steps, secs))
            spec = call_kwargs.pop("_preview", None)
            if spec is not None:
                call_kwargs["preview"] = Preview(lambda step, image: send(("preview", step, image)), *spec)
            send(("ok", getattr(engine, name)(*args, **call_kwargs)))
        except BaseException as e:
            try:
                send(("err", e))
            except Exception:               # an exception that does not pickle
                send(("err", RuntimeError(f"{type(e).__name__}: {e}")))
        if name == "close":
            _free(blocks)
            return


class Worker:
    """The process serving one isolated pipeline: started, restarted after a crash, stopped."""

    def __init__(self, kwargs: dict[str, Any]) -> None:
        self.kwargs = kwargs
        self.process: subprocess.Popen[bytes] | None = None
        self.conn: Connection | None = None
        self.log_path = ""
        self.starts = 0
        self.load_seconds = 0.0

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        fd, self.log_path = tempfile.mkstemp(prefix="sdcpp-worker-", suffix=".log")
        os.close(fd)
        ours, theirs = socket.socketpair()
        start = time.perf_counter()
        with theirs:
            self.process = subprocess.Popen([sys.executable, "-c", _CHILD, str(theirs.fileno()), self.log_path,
                                             json.dumps(sys.path)],
                                            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        self.conn = Connection(ours.detach())
        self.starts += 1
        self.conn.send_bytes(_dumps(self.kwargs, []))
        self._reply([], None, None)
        self.load_seconds = time.perf_counter() - start

    def call(self, kind: str, name: str, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None,
             progress: Any = None, token: Any = None, preview: Preview | None = None) -> Any:
        blocks: list[SharedMemory] = []
        try:
            assert self.conn is not None
            self.conn.send_bytes(_dumps((kind, name, args, kwargs or {}), blocks))
            return self._reply(blocks, progress, token, preview)
        finally:
            _free(blocks)

    def _reply(self, blocks: list[SharedMemory], progress: Any, token: Any, preview: Preview | None = None) -> Any:
        conn = self.conn
        assert conn is not None
        interrupt: BaseException | None = None
        progress_error: BaseException | None = None
        while True:
            try:
                if token is not None and not conn.poll(_POLL_S):
                    if token.is_set():
                        self.cancel()
                    continue
                message = _loads(conn.recv_bytes())
            except (EOFError, OSError):
                raise self._crashed() from None
            except BaseException as e:       # Ctrl-C while waiting: cancel, wait for the stop
                if interrupt is not None:
                    self.stop(kill=True)
                    raise
                interrupt = e
                self.cancel()
                continue
            if message[0] in ("progress", "preview"):
                fn = progress if message[0] == "progress" else (preview.fn if preview is not None else None)
                if fn is not None and progress_error is None:
                    try:
                        fn(*message[1:])
                    except BaseException as e:
                        progress_error = e
                        self.cancel()
                continue
            if interrupt is not None:
                raise interrupt
            if progress_error is not None:
                raise progress_error
            if message[0] == "err":
                raise message[1]
            return message[1]

    def cancel(self) -> None:
        if self.process is not None and self.alive:
            self.process.send_signal(signal.SIGUSR1)

    def _crashed(self) -> EngineCrashed:
        assert self.process is not None
        try:
            code = self.process.wait(10)
        except subprocess.TimeoutExpired:
            code = None
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        tail = "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
        self.stop()
        return EngineCrashed(f"the engine worker process died ({how}); its last lines:\n{tail}")

    def stop(self, kill: bool = False) -> None:
        """Close the worker (it frees its models) or, with ``kill``, end it at once."""
        process, conn, self.process, self.conn = self.process, self.conn, None, None
        if process is not None and process.poll() is None and conn is not None and not kill:
            try:
                conn.send_bytes(_dumps(("call", "close", (), {}), []))
                if conn.poll(30):
                    conn.recv_bytes()
            except (EOFError, OSError):
                pass
        if process is not None:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if conn is not None:
            conn.close()
        if self.log_path:
            Path(self.log_path).unlink(missing_ok=True)
            self.log_path = ""


def _progress_arg(progress: object) -> ProgressFn | None:
    """What the parent calls with the worker's progress messages."""
    if progress is True:
        return TqdmProgress()
    if progress is None or progress is False:
        return None
    if not callable(progress):
        raise TypeError("progress must be a callable(step, steps, seconds), True for a tqdm bar, or None")
    fn: ProgressFn = progress
    return fn


T = TypeVar("T")


def _reply_as(kind: type[T], value: object) -> T:
    """The worker's reply to a call of the Engine method that returns a ``kind``."""
    if not isinstance(value, kind):
        raise SdcppError(f"the engine worker replied with a {type(value).__name__}, not a {kind.__name__}")
    return value


class IsolatedEngine:
    """The Engine's methods, run by an Engine in a worker process (see the module's doc).

    Calls from several threads take turns; ``cancel()`` stops the running one (and the rest
    of the operations begun before it), from any thread."""

    isolated = True

    def __init__(self, paths: dict[str, Path | None], *, release_encoder: bool = False,
                 release_diffusion: bool = False) -> None:
        self.worker = Worker({"paths": paths, "release_encoder": release_encoder,
                              "release_diffusion": release_diffusion})
        self.load_seconds = 0.0
        self._opened: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._epoch = 0
        self._local = threading.local()
        self._finalizer = weakref.finalize(self, self.worker.stop)

    def _call(self, name: str, *args: Any, token: CancelToken | None = None, progress: Any = None,
              preview: Preview | None = None, **kwargs: Any) -> Any:
        check_token(token)
        fn = _progress_arg(progress)
        if fn is not None:
            kwargs["_progress"] = True
        if preview is not None:
            if not isinstance(preview, Preview):
                raise TypeError("preview must be a sdcpp_py.Preview")
            kwargs["_preview"] = (preview.mode, preview.interval, preview.noisy)
        with self._lock:
            if self._closed:
                raise ClosedError("this Pipeline is closed")
            if getattr(self._local, "epoch", self._epoch) != self._epoch:
                raise Cancelled("cancelled")
            try:
                if not self.worker.alive:
                    self._restart()
                return self.worker.call("call", name, args, kwargs, progress=fn, token=token, preview=preview)
            finally:
                if isinstance(fn, TqdmProgress):
                    fn.close()

    def _restart(self) -> None:
        logger.info("starting the engine worker%s", " again" if self.worker.starts else "")
        self.worker.stop()
        self.worker.start()
        if self._opened is not None:
            args, kwargs = self._opened
            self.load_seconds = _reply_as(float, self.worker.call("call", "open", args, kwargs))

    @contextmanager
    def operation(self, token: CancelToken | None = None) -> Iterator[None]:
        """The calls in the block as one operation: a cancel() during it stops the rest of them."""
        check_token(token)
        outer = getattr(self._local, "epoch", None)
        if outer is None:
            self._local.epoch = self._epoch
        try:
            yield
        finally:
            if outer is None:
                del self._local.epoch

    # lifecycle
    def open(self, settings: ContextSettings, **kwargs: Any) -> float:
        self._opened = ((settings,), kwargs)
        with self._lock:
            self._restart()
        return self.load_seconds

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True
        with self._lock:
            self._finalizer()

    def close_later(self) -> None:
        self._closed = True
        self._finalizer()

    def cancel(self) -> None:
        self._epoch += 1
        self.worker.cancel()

    @property
    def pid(self) -> int | None:
        """The worker process's id (None while it is not running)."""
        process = self.worker.process
        return process.pid if process is not None and self.worker.alive else None

    # residency
    def loaded(self, component: int) -> bool:
        return _reply_as(bool, self._call("loaded", component))

    def weight_bytes(self) -> dict[str, int]:
        return _reply_as(dict, self._call("weight_bytes"))

    def all_buffers(self) -> dict[str, str]:
        return _reply_as(dict, self._call("all_buffers"))

    def release(self, component: int) -> None:
        self._call("release", component)

    def load_controlnet(self, path: str | None) -> dict[str, str]:
        return _reply_as(dict, self._call("load_controlnet", path))

    def controlnet(self) -> dict[str, str]:
        return _reply_as(dict, self._call("controlnet"))

    def borrow_encoder(self, owner: Any) -> None:
        raise InvalidArgumentError("isolated pipelines cannot share a text encoder (each has its own process)")

    @property
    def sharing(self) -> bool:
        return False

    # the engine's calls
    def count_tokens(self, text: str) -> int | None:
        count = self._call("count_tokens", text)
        return None if count is None else _reply_as(int, count)

    def default_method(self, sampler: str | None) -> tuple[str, str]:
        return _reply_as(tuple, self._call("default_method", sampler))

    def generate(self, s: GenerationSettings, init_image: ImageLike | None = None,
                 ref_images: Sequence[ImageLike] = (), mask: Image.Image | None = None,
                 **kwargs: Any) -> tuple[list[Image.Image], float, dict[str, str], dict[str, int]]:
        return _reply_as(tuple, self._call("generate", s, init_image, list(ref_images), mask, **kwargs))

    def encode(self, s: GenerationSettings, with_negative: bool, **kwargs: Any) -> tuple[Parts, float]:
        return _reply_as(tuple, self._call("encode", s, with_negative, **kwargs))

    def denoise(self, s: GenerationSettings, condition: Parts, init_latent: np.ndarray | None = None,
                noise: np.ndarray | None = None, ref_images: Sequence[ImageLike] = (),
                mask: Image.Image | None = None, **kwargs: Any) -> tuple[np.ndarray, float, dict[str, int]]:
        return _reply_as(tuple, self._call("denoise", s, condition, init_latent, noise, list(ref_images), mask,
                                           **kwargs))

    def decode(self, s: GenerationSettings, latent: np.ndarray, **kwargs: Any) -> Image.Image:
        return _reply_as(Image.Image, self._call("decode", s, latent, **kwargs))

    def encode_image(self, s: GenerationSettings, image: ImageLike, **kwargs: Any) -> np.ndarray:
        return _reply_as(np.ndarray, self._call("encode_image", s, image, **kwargs))
