"""What user threads hold of an executor's engine (``Handle``): they push tasks and requests (shutdown,
stop workers, change endpoints, stop a task) onto its queue and wake the I/O thread (``Wakeup``); the
I/O thread applies each request in order. Also the hooks that finish every engine's work at interpreter
exit and disarm executors inherited by a forked child.

Runs in user threads (everything the executor calls), except ``*Request.apply``, which the I/O thread
runs. Locks: ``Handle.lock`` and ``Wakeup``'s are leaves (see _engine's threads and locks).
"""

from __future__ import annotations

import collections
import os
import threading
import time
import weakref
from concurrent.futures import Future
from typing import Any, Callable, Optional, Union

from .._wire import _protocol as proto
from .._wire._errors import WorkerLostError
from .._wire._protocol import Kind
from .._wire._curve import ClientKeys
from ._caller import SafeCondition
from ._connection import WorkerInfo, connecting
from ._engine import Engine, Request, live_engines
from ._local import LocalWorker
from ._outcomes import copy_error, fail
from ._scheduler import Task
from ._settings import Settings


class Wakeup:
    """Wakes the I/O thread from any thread without blocking, through a pipe the thread polls."""

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        # Reentrant: a weakref callback may run inside wake() on the same thread during GC.
        self._lock = threading.RLock()
        self._pending = False
        self._closed = False

    def fileno(self) -> int:
        return self._read_fd

    def wake(self) -> None:
        if self._pending:  # read without the lock: the thread has yet to clear it, so it will look
            return
        with self._lock:
            if self._pending or self._closed:
                return
            self._pending = True
            try:
                os.write(self._write_fd, b"\0")
            except BlockingIOError:
                pass  # the pipe is full, so the thread will wake anyway

    def clear(self) -> None:
        with self._lock:
            if not self._pending:
                return
            self._pending = False
            try:
                while os.read(self._read_fd, 4096):
                    pass
            except BlockingIOError:
                pass

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._read_fd)
                os.close(self._write_fd)


# What other threads ask of the I/O thread, besides tasks: each is applied there, in the order asked.

class ShutdownRequest:
    __slots__ = ("cancel_futures",)

    def __init__(self, cancel_futures: bool) -> None:
        self.cancel_futures = cancel_futures

    def apply(self, engine: Engine) -> None:
        engine.shutting_down = True
        if self.cancel_futures:
            engine.scheduler.cancel_backlog()


class StopWorkersRequest:
    __slots__ = ("signum",)

    def __init__(self, signum: int) -> None:
        self.signum = signum

    def apply(self, engine: Engine) -> None:
        engine.stopping_workers = True
        for task in engine.scheduler.take_backlog():
            fail(task, WorkerLostError("the task was waiting for a retry when the workers were stopped"))
        engine.fleet.tell_ready(proto.encode_bare(Kind.TERMINATE, self.signum))


class ChangeEndpointsRequest:
    __slots__ = ("add", "remove", "keys")

    def __init__(self, add: list[str], remove: list[str], keys: Optional[ClientKeys]) -> None:
        self.add, self.remove, self.keys = add, remove, keys

    def apply(self, engine: Engine) -> None:
        engine.fleet.change(self.add, self.remove, self.keys)


class StopTaskRequest:
    """The future of a task in flight was cancelled by force: have its worker stop it (dropped if
    queued there, its process killed if running). What comes back for it is ignored."""

    __slots__ = ("future",)

    def __init__(self, future: "Future[Any]") -> None:
        self.future = future

    def apply(self, engine: Engine) -> None:
        located = engine.scheduler.locate(self.future)
        if located is None:
            return  # done, or waiting here for a retry (it will not be sent again)
        load, task, position = located
        load.owner.cancel(task, position)




class SnapshotRequest:
    """``workers()``: taken by the I/O thread, which owns every connection, and handed back."""

    __slots__ = ("taken", "workers")

    def __init__(self) -> None:
        self.taken = threading.Event()
        self.workers: tuple[WorkerInfo, ...] = ()

    def apply(self, engine: Engine) -> None:
        self.workers = engine.workers_snapshot()
        self.taken.set()


class Handle:
    """All the executor sees of its engine: push a task, shut down, stop workers, change endpoints,
    wait for workers, snapshot, broken."""

    def __init__(self, executor: Any, addresses: list[str], settings: Settings,
                 local_worker: Optional[LocalWorker]) -> None:
        self.lock = threading.Lock()
        self.submissions: collections.deque[Union[Task, Request]] = collections.deque()
        self.wakeup = Wakeup()
        self.shutdown_requested = False
        self.broken: Optional[BaseException] = None
        self.exiting = False  # set at interpreter exit
        self.forked_from: Optional[int] = None  # in a forked child: the pid that owns the I/O thread
        wakeup = self.wakeup
        self.executor_ref: Callable[[], Any] = weakref.ref(executor, lambda _: wakeup.wake())
        # Replaced whole (under the lock), never changed in place: user threads read it without a lock.
        self.addresses: tuple[str, ...] = tuple(addresses)
        self.local_worker = local_worker
        self.changed = SafeCondition()  # notified when a worker becomes ready or is lost
        self.generation = 0  # how often it was notified, for a waiter to see that it missed one
        # Until the I/O thread serves snapshot requests (and after it stopped): what workers() shows.
        self.serving = True
        self.published = tuple(connecting(address) for address in addresses)
        self.engine = Engine(self, addresses, settings, local_worker)
        live_engines.add(self.engine)
        self.engine.start()
        if settings.listen is not None:  # so that a port in use is this call's error
            self.engine.opened.wait()
            if self.engine.open_error is not None:
                self.engine.join()
                raise self.engine.open_error

    def listen_address(self) -> Optional[str]:
        port = self.engine.fleet.port  # set before the constructor returns, when listening
        return None if port is None else port.address

    def workers_changed(self) -> None:
        with self.changed:
            self.generation += 1
            self.changed.notify_all()

    def endpoints_removed(self, removed: list[str]) -> None:
        """Called by the I/O thread once removed endpoints have closed."""
        with self.lock:
            self.addresses = tuple(address for address in self.addresses if address not in removed)

    def engine_finished(self, workers: tuple[WorkerInfo, ...]) -> None:
        """Called by the I/O thread as it stops serving: ``workers`` is what workers() shows from now on."""
        with self.lock:
            self.published = workers
            self.serving = False

    def wait_for_workers(self, n: int, timeout: Optional[float]) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self.changed:
                generation = self.generation
            # Not while holding the condition: the I/O thread takes the snapshot and may notify.
            ready = sum(info.state == "ready" for info in self.snapshot())
            if ready >= n:
                return
            self.check_open()
            if self.engine.opened.is_set() and not self.engine.is_alive():
                raise RuntimeError("the executor has stopped")
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"{ready} of {n} workers ready after {timeout:g} s")
            with self.changed:
                if self.generation == generation:
                    # Bounded, to look at shutdown and breakage now and then.
                    self.changed.wait(0.5 if remaining is None else min(remaining, 0.5))

    def check_open(self) -> None:
        if self.forked_from is not None:
            raise RuntimeError(f"this executor belongs to process {self.forked_from}; a process forked from it "
                               "cannot use it (its I/O thread did not survive the fork): create a new one here")
        if self.broken is not None:
            raise copy_error(self.broken)
        if self.shutdown_requested:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if _global_shutdown:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    def push(self, task: Task) -> None:
        with self.lock:
            self.check_open()
            queued = bool(self.submissions)
            if queued:  # behind those, in order
                self.submissions.append(task)
        if not queued:
            if self.engine.caller.send(task):
                return
            with self.lock:
                self.check_open()  # again: a shutdown since then may have let the I/O thread finish
                self.submissions.append(task)
        self.wakeup.wake()

    def shutdown(self, *, wait: bool, cancel_futures: bool) -> None:
        with self.lock:
            first = not self.shutdown_requested
            self.shutdown_requested = True
            if first or cancel_futures:
                self.submissions.append(ShutdownRequest(cancel_futures))
        self.wakeup.wake()
        # Not from the I/O thread, nor from a caller reading replies (a future's callback): the I/O
        # thread could not finish while that thread waits for it.
        if wait and self.engine is not threading.current_thread() and not self.engine.caller.reading_here():
            self.engine.join()

    def stop_task(self, future: "Future[Any]") -> None:
        with self.lock:
            self.submissions.append(StopTaskRequest(future))
        self.wakeup.wake()

    def change_endpoints(self, add: list[str], remove: list[str], keys: Optional[ClientKeys]) -> None:
        with self.lock:
            self.check_open()
            self.addresses += tuple(add)  # so that endpoints shows them at once
            self.submissions.append(ChangeEndpointsRequest(add, remove, keys))
        self.wakeup.wake()

    def stop_workers(self, signum: int) -> None:
        self.shutdown(wait=False, cancel_futures=True)
        with self.lock:
            self.submissions.append(StopWorkersRequest(signum))
        self.wakeup.wake()

    def snapshot(self) -> tuple[WorkerInfo, ...]:
        """Taken by the I/O thread, which owns the connections (a request like the others); by this
        thread itself if it is the I/O thread or holds its lock (a callback run there)."""
        engine = self.engine
        if engine is threading.current_thread() or engine.caller.reading_here():
            return engine.workers_snapshot()
        request = SnapshotRequest()
        with self.lock:
            if not self.serving or self.forked_from is not None:
                return self.published
            self.submissions.append(request)
        self.wakeup.wake()
        while not request.taken.wait(0.05):
            alive = engine.is_alive()
            with self.lock:
                if not self.serving or not alive:  # it stopped before taking the request
                    return self.published
        return request.workers


# Interpreter exit: like the stdlib executors, finish submitted work before the interpreter goes away.
_global_shutdown = False


def _python_exit() -> None:
    global _global_shutdown
    _global_shutdown = True
    engines = list(live_engines)
    for engine in engines:
        engine.handle.exiting = True
        engine.handle.wakeup.wake()
    for engine in engines:
        engine.join()


threading._register_atexit(_python_exit)  # type: ignore[attr-defined]


def _after_fork_in_child() -> None:
    # The child has copies of the executors but not their I/O threads: make every use fail at once
    # (never a future that waits forever), and let its exit leave the parent's engines alone.
    parent = os.getppid()
    for engine in list(live_engines):
        engine.handle.forked_from = parent
    live_engines.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
