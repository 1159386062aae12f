"""The lone task's shortcuts on the embedded worker: the caller's own thread sends and reads.

Runs in user threads (in submit, result and exception), under the contract below.

Data flow::

    submit --> CallerPath.send: nothing else out, the engine idle? --- TASK or LONE_TASK ---> a Lane
               (LONE_TASK when this caller read its last reply itself: see _taskprocess)
    Future.result / exception --> its condition's wait (ReadingCondition) --> CallerPath.read_for:
        the I/O thread's interest in the lanes paused (epoll_ctl, no wake-up), then in this thread:
        <--- READY, RESULT EXCEPTION INIT_FAILED OUTPUT --- Embedded.receive, then dispatch_tasks
        until this future is done (or the wait times out); then the interest is back

A lone task's round trip costs mostly wake-ups, each tens of µs on a VM. Through the I/O thread it
takes three: the task process, the I/O thread for the reply, the caller for its future. These
shortcuts leave one: the task process's reply wakes the caller itself, and the task process, which
looks for its next task awake a moment after replying (_taskprocess), is found awake.

The futures stay standard ``concurrent.futures.Future`` objects: only the condition they wait on is
ours, which ``result`` and ``exception`` wait on, and which every change to done notifies.

The lanes are plain Unix sockets: every ZeroMQ socket stays with the I/O thread. Whoever holds the
engine's lock may touch the scheduler and the lanes; the I/O thread lets go of it only while it
waits. While a caller sends or reads, Ctrl-C is held back and raised once that is over, so that no
KeyboardInterrupt leaves the lock taken, a task half sent or a reply half read. A future's own lock
is a C lock (SafeCondition), for the same reason: a Ctrl-C can leave a stdlib Condition's taken.
"""

from __future__ import annotations

import _thread
import collections
import logging
import os
import select
import signal
import threading
import time
from concurrent import futures
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol

from .._wire import _features
from .._wire._errors import BrokenWorkerPool
from ._scheduler import Task

if TYPE_CHECKING:
    from ._direct import DirectLanes
    from ._scheduler import Scheduler


class EngineSteps(Protocol):
    """What a caller's thread may use of the engine (_engine.Engine), and only with ``lock`` held (taken
    without blocking): its scheduler and lanes, and the loop steps that send and read."""

    lock: Any  # the engine's threading.Lock
    scheduler: "Scheduler"
    handle: Any  # its shutdown_requested and wakeup

    def dispatch_tasks(self) -> None: ...

    def break_executor(self, error: BaseException) -> None: ...

logger = logging.getLogger("zmqexecutor")

# The signal module's functions wrap the C ones of _signal to turn numbers into enums, at about 8 µs
# a call (an exception inside each); the C ones take well under 1 µs, and a lone task's wait makes two.
try:
    import _signal as _c_signal  # type: ignore[import-not-found]
except ImportError:  # not CPython
    _c_signal = signal
_set_handler: Callable[[int, Any], Any] = _c_signal.signal
_get_handler: Callable[[int], Any] = _c_signal.getsignal


class CallerPath:
    """What a caller's thread may do itself for the embedded worker's task processes."""

    def __init__(self, engine: EngineSteps) -> None:
        self.engine = engine
        self.open = False  # changed with the engine's lock held
        self.reader: Optional[int] = None  # the thread reading the lanes now
        self.read_its_reply = False  # the last reader's future was settled by what it read
        self.lanes: Optional["DirectLanes"] = None
        self.receive: Callable[[], None] = lambda: None  # reads the lanes and settles what came
        self.io_interest: Optional[select.epoll] = None
        self.waiting: Optional[select.epoll] = None
        # Also orders a reader's leaving against close(). Reentrant: the held-back Ctrl-C rings, and it
        # may come while this thread holds the lock.
        self.bell_lock = threading.RLock()
        self.bell = -1
        self.closing = False  # close() came while a reader was still on its way out

    def start(self, lanes: "DirectLanes", io_selector: Any, receive: Callable[[], None]) -> None:
        """Called by the I/O thread, its lock held, once the lanes are open. Without epoll and eventfd
        (not Linux) the path stays closed: the I/O thread sends and reads every task."""
        if not (_features.EPOLL and _features.EVENTFD):
            return
        self.lanes = lanes
        self.receive = receive
        # The same epoll instance as the I/O thread's selector, so that a caller can pause the
        # lanes there without the selector's bookkeeping (and without waking the thread).
        self.io_interest = select.epoll.fromfd(os.dup(io_selector.fileno()))
        self.bell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.waiting = select.epoll()
        self.waiting.register(lanes.fileno(), select.EPOLLIN)
        self.waiting.register(self.bell, select.EPOLLIN)
        self.open = True

    def send(self, task: Task) -> bool:
        """Send ``task`` from this thread if a local task process is free and the I/O thread is only
        waiting; False when it must go the usual way (the queue)."""
        # Only a task that finds nothing else out: one more among many gains nothing from going alone
        # (the I/O thread sends them many to a message). Read without the lock, as hints; the checks
        # that count are made again with it held.
        if not self.open or self.engine.scheduler.in_flight or self.engine.lock.locked():
            return False
        with _HeldInterrupt(self.ring):
            return self.send_now(task)

    def send_now(self, task: Task) -> bool:
        engine = self.engine
        if not engine.lock.acquire(blocking=False):
            return False
        try:
            scheduler = engine.scheduler
            if not self.open or scheduler.in_flight or scheduler.backlog or not scheduler.turns:
                return False
            assert self.lanes is not None
            # A caller that waited for its last reply and sends while nothing else is out works one
            # task at a time: the process it goes to may look for the next one awake.
            self.lanes.lone_next = self.read_its_reply
            self.read_its_reply = False
            scheduler.add(task)
            try:
                engine.dispatch_tasks()
            finally:
                self.lanes.lone_next = False
            if scheduler.backlog:  # its process just went away: the I/O thread must see to it
                engine.handle.wakeup.wake()
            return True
        finally:
            engine.lock.release()

    def may_read(self) -> bool:
        """Whether a caller could read now: only a few tasks out and no other reader (a hint without
        the engine's lock; the answer that counts is taken with it, in become_reader)."""
        scheduler = self.engine.scheduler
        return self.open and self.reader is None and not scheduler.backlog \
            and self.lanes is not None and scheduler.in_flight <= len(self.lanes.lanes)

    def read_for(self, waiting: "ReadingCondition", timeout: Optional[float], held: "_HeldInterrupt") -> bool:
        """Read the lanes in this thread until ``waiting``'s future is done or ``timeout`` passes, if no
        other thread reads them and only a few tasks are out; False, at once, if not. Called with
        Ctrl-C held back (``held``)."""
        if not self.become_reader(waiting):
            return False
        try:
            self.read_until(waiting, timeout, held)
        finally:
            self.stop_reading()
        return True

    def become_reader(self, waiting: "ReadingCondition") -> bool:
        engine = self.engine
        if not engine.lock.acquire(blocking=False):
            return False
        try:
            # With many tasks out, the I/O thread's batching does better than a reader per future.
            if waiting.done or not self.may_read():
                return False
            self.reader = threading.get_ident()
            self.pause_io_thread(True)
            return True
        finally:
            engine.lock.release()

    def stop_reading(self) -> None:
        engine = self.engine
        with engine.lock:
            with self.bell_lock:
                self.reader = None
                close_now = self.closing
            if self.open:
                self.pause_io_thread(False)
            wake = self.open and (engine.handle.shutdown_requested or bool(engine.scheduler.backlog))
        if wake:  # the I/O thread may be waiting for what was settled here
            engine.handle.wakeup.wake()
        if close_now:
            self.close()

    def read_until(self, waiting: "ReadingCondition", timeout: Optional[float], held: "_HeldInterrupt") -> None:
        engine = self.engine
        assert self.waiting is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        while not waiting.done and not held.caught:
            remaining = -1.0 if deadline is None else deadline - time.monotonic()
            if deadline is not None and remaining <= 0:
                return
            try:
                ready = self.waiting.poll(remaining, 2)
            except (ValueError, OSError):  # closed: the I/O thread has finished, every future settled
                return
            if not self.readable(ready):
                continue
            with engine.lock:
                if not self.open:
                    return
                try:
                    self.receive()
                    engine.dispatch_tasks()
                    self.read_its_reply = waiting.done
                except Exception as exc:  # what would have ended the I/O thread
                    logger.exception("zmqexecutor failed reading replies in a caller's thread")
                    engine.break_executor(BrokenWorkerPool(f"reading replies failed: {exc!r}"))

    def readable(self, ready: list[tuple[int, int]]) -> bool:
        lanes = False
        for fd, _ in ready:
            if fd == self.bell:
                try:
                    os.eventfd_read(self.bell)
                except BlockingIOError:
                    pass
            else:
                lanes = True
        return lanes

    def pause_io_thread(self, paused: bool) -> None:
        # Resumed with something unread, the I/O thread's epoll_wait returns at once: nothing is missed.
        assert self.io_interest is not None and self.lanes is not None
        self.io_interest.modify(self.lanes.fileno(), 0 if paused else select.EPOLLIN)

    def ring(self) -> None:
        with self.bell_lock:
            if self.bell >= 0:
                os.eventfd_write(self.bell, 1)

    def done_elsewhere(self) -> None:
        # A future done by another thread (the I/O thread settling a process that ended, a cancel, a
        # broken executor) while this one reads: the reader would otherwise sleep on until its timeout.
        reader = self.reader
        if reader is not None and reader != threading.get_ident():
            self.ring()

    def reading_here(self) -> bool:
        return self.reader == threading.get_ident()

    def stop(self) -> None:
        """Called by the I/O thread, its lock held, before it closes the lanes."""
        self.open = False

    def close(self) -> None:
        """Called by the I/O thread as it ends (no new reader can start: see stop)."""
        with self.bell_lock:
            if self.reader is not None:  # still polling them: it closes them as it stops reading
                self.closing = True
                return
            for epoll in (self.io_interest, self.waiting):
                if epoll is not None:
                    epoll.close()
            if self.bell >= 0:
                bell, self.bell = self.bell, -1  # a ring in between finds none
                os.close(bell)


class _HeldInterrupt:
    """Ctrl-C (SIGINT) held back in the main thread while it sends or reads, then raised there."""

    def __init__(self, ring: Callable[[], None]) -> None:
        self.ring = ring
        self.saved: Any = None
        self.caught: Optional[tuple[int, Optional[FrameType]]] = None

    def __enter__(self) -> "_HeldInterrupt":
        if threading.current_thread() is threading.main_thread():
            handler = _get_handler(signal.SIGINT)
            if callable(handler):
                self.saved = handler
                _set_handler(signal.SIGINT, self.hold)
        return self

    def hold(self, signum: int, frame: Optional[FrameType]) -> None:
        self.caught = (signum, frame)
        self.ring()  # ends the wait

    def __exit__(self, *_: Any) -> None:
        if self.saved is None:
            return
        if _get_handler(signal.SIGINT) == self.hold:  # unless the user's code changed it meanwhile
            _set_handler(signal.SIGINT, self.saved)
        if self.caught is not None:
            self.saved(*self.caught)


class SafeCondition(_thread.RLock):  # type: ignore[misc]  # final in typeshed only
    """A ``threading.Condition`` whose lock a Ctrl-C cannot leave taken.

    ``with`` on a stdlib Condition runs its Python ``__enter__`` and ``__exit__``, and a
    KeyboardInterrupt can strike inside either while the lock is taken: then nobody releases it.
    Here that happened to one Ctrl-C in three in a contended ``with``; for a future's condition the
    I/O thread then waits for its lock for good, in ``set_result``. This one is the lock itself, so
    ``with`` takes and releases it in C. Used for our futures and for the executor's own waits."""

    def __init__(self) -> None:
        self._waiters: collections.deque[Any] = collections.deque()

    def wait(self, timeout: Optional[float] = None) -> bool:
        if not self._is_owned():  # type: ignore[attr-defined]
            raise RuntimeError("cannot wait on un-acquired lock")
        waiter = _thread.allocate_lock()
        waiter.acquire()
        self._waiters.append(waiter)
        state = self._release_save()  # type: ignore[attr-defined]
        woken = False
        try:
            if timeout is None:
                woken = waiter.acquire()
            else:
                woken = waiter.acquire(True, timeout) if timeout > 0 else waiter.acquire(False)
            return woken
        finally:
            self._acquire_restore(state)  # type: ignore[attr-defined]
            if not woken:
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass

    def notify(self, n: int = 1) -> None:
        if not self._is_owned():  # type: ignore[attr-defined]
            raise RuntimeError("cannot notify on un-acquired lock")
        waiters = self._waiters
        while waiters and n > 0:
            waiters.popleft().release()
            n -= 1

    def notify_all(self) -> None:
        self.notify(len(self._waiters))


class ReadingCondition(SafeCondition):  # type: ignore[misc]
    """The condition of a standard Future of the embedded worker: waited on, it reads the reply itself
    when it can (``CallerPath.read_for``), and waits as any condition when it cannot."""

    def __init__(self, path: CallerPath) -> None:
        super().__init__()
        self.path = path
        self.done = False  # the future is done: every change to done notifies

    def notify_all(self) -> None:
        self.done = True
        super().notify_all()
        if self.path.reader is not None:
            self.path.done_elsewhere()

    def wait(self, timeout: Optional[float] = None) -> bool:
        if not self.done and self.path.may_read():
            started = time.monotonic()
            # Held back from before the lock is let go until it is taken again: a Ctrl-C in between
            # would leave the future's ``with`` without its lock.
            with _HeldInterrupt(self.path.ring) as held:
                state = self._release_save()  # type: ignore[attr-defined]
                try:
                    read = self.path.read_for(self, timeout, held)
                finally:
                    self._acquire_restore(state)  # type: ignore[attr-defined]
            if read and (self.done or timeout is not None):
                return self.done
            if timeout is not None:
                timeout = max(0.0, timeout - (time.monotonic() - started))
        return super().wait(timeout)


def new_future(path: Optional[CallerPath]) -> "futures.Future[Any]":
    """A standard Future whose condition survives Ctrl-C (SafeCondition); for the embedded worker
    (``path``), one whose waits may read its reply."""
    future: futures.Future[Any] = futures.Future()
    future._condition = SafeCondition() if path is None else ReadingCondition(path)  # type: ignore[assignment]
    return future
