"""Crash isolation: ``Pipeline(..., isolate=True)`` runs the engine in a worker process.

The worker holds a normal Pipeline with its models resident and serves the parent's
calls one at a time over a pipe. Arrays and images cross by shared memory (pickle's
out-of-band ``persistent_id``), everything else by pickle. When the engine aborts
the worker (a failed assert), the call raises :class:`EngineCrashed` with the
worker's last log lines and the next call starts a new worker, models reloaded.
Cancel, cancel tokens, Ctrl-C and progress callbacks work as in-process: the
parent signals the worker (SIGUSR1), which cancels its pipeline. The worker
ignores SIGINT, so a terminal's Ctrl-C reaches the parent only.
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
import time
import weakref
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

import numpy as np
from PIL import Image

from ._callbacks import Preview, ProgressFn, TqdmProgress
from ._engine_thread import CancelToken, check_token
from ._images import ImageLike
from .errors import ClosedError, EngineCrashed, InvalidArgumentError, SdcppError
from .pipeline import GenerationResult, Pipeline
from .settings import GenerationSettings
from .staged import Conditioning, Latent

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


def _serve(conn: Connection, kwargs: dict[str, Any], log_path: str) -> None:
    """The worker's main: one Pipeline, calls until "close" or the parent goes away."""
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

    try:
        pipe = Pipeline(**kwargs)
    except BaseException as e:
        send(("err", e))
        return
    signal.signal(signal.SIGUSR1, lambda *_: pipe.cancel())
    send(("ok", {n: getattr(pipe, n) for n in _MIRRORED}))
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            pipe.close()
            return
        _free(blocks)                        # the parent copied the previous reply out
        kind, name, args, call_kwargs = _loads(data)
        if kind == "abort":
            from ._ffi import lib
            lib.sdcpp_test_abort()
        try:
            if kind == "get":
                result = getattr(pipe, name)
            else:
                if call_kwargs.pop("_progress", False):
                    call_kwargs["progress"] = lambda step, steps, secs: send(("progress", step, steps, secs))
                spec = call_kwargs.pop("_preview", None)
                if spec is not None:
                    call_kwargs["preview"] = Preview(lambda step, image: send(("preview", step, image)), *spec)
                result = getattr(pipe, name)(*args, **call_kwargs)
            send(("ok", result))
        except BaseException as e:
            try:
                send(("err", e))
            except Exception:               # an exception that does not pickle
                send(("err", RuntimeError(f"{type(e).__name__}: {e}")))
        if name == "close":
            _free(blocks)
            return


# attributes of the worker's pipeline the parent keeps a copy of (they do not change)
_MIRRORED = ("family", "components", "preset", "paths", "settings", "encoder_id", "device", "weight_plan")


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

    def start(self) -> dict[str, Any]:
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
        info = _reply_as(dict, self._reply([], None, None))
        self.load_seconds = time.perf_counter() - start
        return info

    def call(self, kind: str, name: str, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None,
             progress: Any = None, token: Any = None, preview: Preview | None = None) -> Any:
        if not self.alive:
            logger.info("starting the engine worker again")
            self.stop()
            self.start()
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
    """The worker's reply to a call of the Pipeline method that returns a ``kind``."""
    if not isinstance(value, kind):
        raise SdcppError(f"the engine worker replied with a {type(value).__name__}, not a {kind.__name__}")
    return value


class IsolatedPipeline(Pipeline):
    """A Pipeline whose engine runs in a worker process (``Pipeline(..., isolate=True)``).

    Every method and property of Pipeline works and gives the same pixels; an engine
    abort raises EngineCrashed, and the next call starts a new worker."""

    def __init__(self, *, isolate: bool = True, share_encoder_with: Pipeline | None = None,
                 **kwargs: Any) -> None:
        if share_encoder_with is not None:
            raise InvalidArgumentError("isolated pipelines cannot share a text encoder (each has its own process)")
        for name in ("model", "diffusion_model", "llm", "vae"):
            if kwargs.get(name) is not None:
                kwargs[name] = str(Path(kwargs[name]).expanduser().resolve())
        self._worker = Worker(kwargs)
        self._closed = False
        info = self._worker.start()
        for name, value in info.items():
            setattr(self, name, value)
        self.load_seconds = self._worker.load_seconds
        self._finalizer = weakref.finalize(self, self._worker.stop)

    def _call(self, name: str, *args: Any, progress: Any = None, cancel: Any = None, **kwargs: Any) -> Any:
        if self._closed:
            raise ClosedError("this Pipeline is closed")
        check_token(cancel)
        fn = _progress_arg(progress)
        if fn is not None:
            kwargs["_progress"] = True
        preview = kwargs.pop("preview", None)
        if preview is not None:
            if not isinstance(preview, Preview):
                raise TypeError("preview must be a sdcpp_py.Preview")
            kwargs["_preview"] = (preview.mode, preview.interval, preview.noisy)
        try:
            return self._worker.call("call", name, args, kwargs, progress=fn, token=cancel, preview=preview)
        finally:
            if isinstance(fn, TqdmProgress):
                fn.close()

    def _get(self, name: str) -> Any:
        if self._closed:
            raise ClosedError("this Pipeline is closed")
        return self._worker.call("get", name)

    # lifecycle
    def close(self) -> None:
        self._closed = True
        self._finalizer()

    def cancel(self) -> None:
        self._worker.cancel()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def worker_pid(self) -> int | None:
        """The worker process's id (None until it starts again after a crash)."""
        process = self._worker.process
        return process.pid if process is not None and self._worker.alive else None

    @property
    def worker_starts(self) -> int:
        return self._worker.starts

    def _crash_for_test(self) -> None:
        """Make the worker abort() as a failed engine assert does (tests of the isolation)."""
        self._worker.call("abort", "")

    # calls
    def generate(self, prompt: str, **kwargs: Any) -> GenerationResult:
        return _reply_as(GenerationResult, self._call("generate", prompt, **kwargs))

    __call__ = generate

    def generate_with(self, s: GenerationSettings, **kwargs: Any) -> GenerationResult:
        return _reply_as(GenerationResult, self._call("generate_with", s, **kwargs))

    def settings_for(self, prompt: str, **overrides: Any) -> GenerationSettings:
        return _reply_as(GenerationSettings, self._call("settings_for", prompt, **overrides))

    def encode(self, prompt: str, negative_prompt: str | None = None, **kwargs: Any) -> Conditioning:
        return _reply_as(Conditioning, self._call("encode", prompt, negative_prompt, **kwargs))

    def denoise(self, conditioning: Conditioning, **kwargs: Any) -> Latent:
        return _reply_as(Latent, self._call("denoise", conditioning, **kwargs))

    @overload
    def decode(self, latent: Latent, *, output_type: Literal["pil"] = ..., vae_tiling: bool = False,
               cancel: CancelToken | None = None) -> Image.Image: ...

    @overload
    def decode(self, latent: Latent, *, output_type: Literal["np"], vae_tiling: bool = False,
               cancel: CancelToken | None = None) -> np.ndarray: ...

    def decode(self, latent: Latent, **kwargs: Any) -> Image.Image | np.ndarray:
        reply = self._call("decode", latent, **kwargs)
        return reply if isinstance(reply, np.ndarray) else _reply_as(Image.Image, reply)

    def encode_image(self, image: ImageLike, **kwargs: Any) -> Latent:
        return _reply_as(Latent, self._call("encode_image", image, **kwargs))

    def release_encoder(self) -> None:
        self._call("release_encoder")

    def release_diffusion_model(self) -> None:
        self._call("release_diffusion_model")

    # state
    @property
    def encoder_loaded(self) -> bool:
        return _reply_as(bool, self._get("encoder_loaded"))

    @property
    def diffusion_loaded(self) -> bool:
        return _reply_as(bool, self._get("diffusion_loaded"))

    @property
    def weight_bytes(self) -> dict[str, int]:
        return _reply_as(dict, self._get("weight_bytes"))

    @property
    def weights(self) -> dict[str, Any]:
        return _reply_as(dict, self._get("weights"))

    @property
    def shares_encoder(self) -> bool:
        return False

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"worker pid {self.worker_pid}"
        return f"<Pipeline {self.family} isolated, {state} device={self.device}>"
