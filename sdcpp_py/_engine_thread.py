"""The engine thread: every native call on a context runs on one thread of the process.

The engine's progress callback is process-wide and its computations are not
re-entrant, so calls are serialised in any case. Running them on one thread of
their own gives three things a caller's thread cannot: the caller waits
interruptibly (Python runs signal handlers only between bytecodes, never while a
thread is inside C, so Ctrl-C would otherwise wait for the end of the call), any
thread can stop the running call (``cancel``), and the CPU backend's thread team
stays with one thread. The caller's objects stay alive in the call's closure, so a
caller that stops waiting frees nothing the engine still reads.

Cancellation is by ``Operation``: a public call of a pipeline is one operation,
however many native calls it makes; cancelling an owner stops its operations
started before the cancel, the running native call through the engine's abort
flag, the waiting ones before they start.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar, cast

from ._ffi import lib
from .errors import Cancelled, ReentrantCallError

logger = logging.getLogger("sdcpp_py")
T = TypeVar("T")


class CancelToken(Protocol):
    """What a per-call ``cancel=`` accepts: a ``threading.Event`` or anything with ``is_set()``."""

    def is_set(self) -> bool: ...


class Owner:
    """Something whose operations can be cancelled together (an Engine)."""

    def __init__(self) -> None:
        self.cancel_epoch = 0


class Operation:
    """One public call: cancelled when its owner is cancelled after it began, or its token is set."""

    def __init__(self, owner: Owner | None, token: CancelToken | None) -> None:
        check_token(token)
        self.owner = owner
        self.token = token
        self.epoch = owner.cancel_epoch if owner is not None else 0
        self.interrupted = False

    @property
    def cancelled(self) -> bool:
        return (self.interrupted or (self.owner is not None and self.owner.cancel_epoch > self.epoch)
                or (self.token is not None and bool(self.token.is_set())))


def check_token(token: object) -> None:
    """A ``cancel=`` argument must be None or have ``is_set()`` (a ``threading.Event``)."""
    if token is not None and not callable(getattr(token, "is_set", None)):
        raise TypeError(f"cancel must be a threading.Event (anything with is_set()), not {type(token).__name__}")


class _Call:
    __slots__ = ("fn", "operation", "discard", "abandoned", "done", "result", "error")

    def __init__(self, fn: Callable[[], Any], operation: Operation,
                 discard: Callable[[Any], None] | None = None) -> None:
        self.fn = fn
        self.operation = operation
        self.discard = discard
        self.abandoned = False
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


# The engine parses a prompt's attention syntax with std::regex, which recurses per character of a
# run without brackets: a 1.5 KB prompt took 8 MB (78,500 frames) in one test session and
# overflowed the default stack (SIGSEGV). Address space only: pages are touched as deep as a call goes.
ENGINE_STACK_BYTES = 512 << 20
_STOP = object()
_POLL_S = 0.05           # how often a waiting caller looks at its cancel token


class EngineThread:
    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._cv = threading.Condition()
        self._queue: collections.deque[Any] = collections.deque()
        self._thread: threading.Thread | None = None
        self._running: _Call | None = None
        self._stopped = False
        self._local = threading.local()

    # -- where we are ----------------------------------------------------------------------
    @property
    def on_engine_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def current_operation(self) -> Operation | None:
        """The operation of the caller's thread (None outside a pipeline call)."""
        return getattr(self._local, "operation", None)

    @contextlib.contextmanager
    def operation(self, owner: Owner | None, token: CancelToken | None = None) -> Iterator[Operation]:
        """Group the native calls of one public call; nested calls join the outer operation."""
        outer = self.current_operation()
        if outer is not None:
            yield outer
            return
        op = Operation(owner, token)
        self._local.operation = op
        try:
            yield op
        finally:
            self._local.operation = None

    # -- running ---------------------------------------------------------------------------
    def run(self, fn: Callable[[], T], owner: Owner | None = None,
            token: CancelToken | None = None, discard: Callable[[T], None] | None = None) -> T:
        """Run ``fn`` on the engine thread and return what it returns (or raise what it raised).

        Ctrl-C while waiting cancels the call, waits for it to stop (a second Ctrl-C stops
        waiting) and raises KeyboardInterrupt; a result the caller will then never see is
        handed to ``discard`` on the engine thread (native handles)."""
        if self.on_engine_thread:
            raise ReentrantCallError("the engine is busy with a call on this thread: a progress callback "
                                     "must not call into (or close) a pipeline")
        with self.operation(owner, token) as op:
            call = _Call(fn, op, discard)
            with self._cv:
                if self._stopped:
                    return fn()           # interpreter exit: no thread any more, nothing runs beside us
                self._start()
                self._queue.append(call)
                self._cv.notify()
            return cast(T, self._wait(call))   # the queue holds calls of every result type

    def post(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the engine thread after the calls queued now, without waiting (finalizers)."""
        with self._cv:
            if self._stopped:
                fn()
                return
            self._start()
            call = _Call(fn, Operation(None, None))
            call.abandoned = True         # nobody waits: its error is logged
            self._queue.append(call)
            self._cv.notify()

    def _wait(self, call: _Call) -> Any:
        interrupt: BaseException | None = None
        while not call.done.is_set():
            try:
                if call.operation.token is None:
                    call.done.wait()
                elif not call.done.wait(_POLL_S) and call.operation.cancelled:
                    self._stop_running(call)
            except BaseException as e:      # KeyboardInterrupt, or what a signal handler raised
                if interrupt is not None:   # asked twice: stop waiting, the call ends on its own
                    self._abandon(call)
                    raise
                interrupt = e
                call.operation.interrupted = True
                self._stop_running(call)
        if interrupt is not None:
            self._abandon(call)
            raise interrupt
        if call.error is not None:
            raise call.error
        return call.result

    def _abandon(self, call: _Call) -> None:
        """The caller will not take the call's result: the thread discards it when it comes."""
        with self._cv:
            if not call.done.is_set():
                call.abandoned = True
                return
        if call.error is None and call.discard is not None:
            result, discard = call.result, call.discard
            self.post(lambda: discard(result))

    def _stop_running(self, call: _Call) -> None:
        with self._cv:
            if self._running is call:
                lib.sdcpp_cancel()

    def cancel(self, owner: Owner) -> None:
        """Cancel the operations of ``owner`` begun so far: the running call stops within the
        graph it computes, waiting ones raise Cancelled without starting."""
        with self._cv:
            owner.cancel_epoch += 1
            running = self._running
            if running is not None and running.operation.owner is owner:
                lib.sdcpp_cancel()

    def check_cancelled(self) -> None:
        """Raise Cancelled when the operation running on this (engine) thread was cancelled."""
        running = self._running
        if running is not None and running.operation.cancelled:
            raise Cancelled("cancelled")

    # -- the thread ------------------------------------------------------------------------
    def _start(self) -> None:
        if self._thread is None:
            previous = threading.stack_size(ENGINE_STACK_BYTES)
            try:
                self._thread = threading.Thread(target=self._loop, name="sdcpp-engine", daemon=True)
                self._thread.start()
            finally:
                threading.stack_size(previous)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue:
                    self._cv.wait()
                call = self._queue.popleft()
                if call is _STOP:
                    return
                try:
                    refused: BaseException | None = (Cancelled("cancelled before it started")
                                                     if call.operation.cancelled else None)
                except Exception as e:   # a token whose is_set() raised: that call fails, the thread lives
                    refused = e
                if refused is not None:
                    call.error = refused
                    call.done.set()
                    continue
                lib.sdcpp_cancel_clear()
                self._running = call
            try:
                call.result = call.fn()
            except BaseException as e:
                call.error = e
            finally:
                with self._cv:
                    self._running = None
                    lib.sdcpp_cancel_clear()
                    call.done.set()
                    abandoned = call.abandoned
            if abandoned and call.error is not None and not isinstance(call.error, Cancelled):
                logger.error("an engine call nobody waits for failed: %r", call.error)
            if abandoned and call.error is None and call.discard is not None:
                try:
                    call.discard(call.result)
                except Exception:
                    logger.exception("discarding the result of an abandoned call failed")
            call = None                 # drop the closure (and what it keeps alive) now

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the running call and the thread (at interpreter exit); later calls run inline."""
        with self._cv:
            thread, self._stopped = self._thread, True
            if thread is None:
                return
            for c in self._queue:
                if c is not _STOP and c.operation.owner is not None:   # callers' calls; finalizers still run
                    c.operation.interrupted = True
            if self._running is not None:
                lib.sdcpp_cancel()
            self._queue.append(_STOP)
            self._cv.notify()
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("the engine thread did not stop within %.0f s", timeout)


ENGINE_THREAD = EngineThread()
atexit.register(ENGINE_THREAD.shutdown)
os.register_at_fork(after_in_child=ENGINE_THREAD._reset)   # a forked child has no engine thread
