"""The client engine: one I/O thread per executor that owns every socket and resolves every future.

Runs in the client's I/O thread (``Engine``); user threads reach it through ``_handle.Handle`` (threads
and locks below).

Data flow::

    user threads                          I/O thread (Engine)                              workers
    ------------                          -------------------                              -------
    submit(fn, *args)
      pickle (in the caller's thread)
      |
      +--> Handle.push --> submissions --+--> Scheduler.backlog (Future.cancel() works here)
      |    (deque)         + a pipe byte |        | next_batches: round-robin over workers with credit,
      |                                  v        v  several tasks per message when several wait
      |                              WorkerConnection (DEALER) ---- TASK or BATCH of TASKs ---->
      |                                           ^
      +<-- Future.set_result / set_exception -----+---- RESULT EXCEPTION CRASHED INIT_FAILED DROPPED
                                                  |     LOST OUTPUT (alone or in a BATCH), WELCOME,
                                                  |     PONG, REJECTED, EXITED (embedded worker)
                                                  +---- monitor: handshake done/failed, disconnected
                                                  |
                                                  |  embedded worker only (Embedded, _local): its task
                                                  +---- processes' DirectLanes (Unix socket), a lane each:
                                                  |     TASK or BATCH, STOP -->  <-- READY, replies
                                                  |
                                                  |  with listen= (_dialin): workers that dial in
                                                  +---- DialInPort (ROUTER) <-> a DialledConnection each:
                                                        <-- JOIN, then as a WorkerConnection; monitor:
                                                        a connection closed (whose: ping them all)

The embedded worker's tasks skip its supervisor: the scheduler sees each of its task processes as a
worker of one slot, and the supervisor reports (EXITED) when one ends so that ``Embedded`` can settle
what it held. The loop has no case of its own for it: every source of input (a bound worker's
connection, the dial-in port, the embedded worker's lanes) has ``take_input``, every worker's load an
owner that sends and cancels its tasks, and without an embedded worker ``NoLocalWorker`` stands in. Remote workers get their tasks through their supervisor. What replies and lost workers
do to futures is ``Outcomes``' business (_outcomes); which worker gets what, the ``Scheduler``'s.

Each loop turn waits once (epoll over the sockets' descriptors, so a turn costs the same however many
workers there are), reads every socket that has input until it would block (bounded per socket),
takes every submission, sends every batch there is credit for, and expires what waited too long.
Heartbeats, liveness and the local worker are looked at once per tick, not per message.

A worker is lost when its connection closes (a libzmq monitor event; libzmq's own heartbeats close a
connection whose peer went silent) or when a PING stays unanswered for ``worker_timeout``. The
scheduler puts its tasks in flight back at the front of the backlog, unless they were lost
``max_retries`` times already. A task is resolved only by the worker it is in flight on, once, so
late and duplicate replies fall through.

The thread holds the executor only weakly: when the executor is shut down, garbage collected, or the
interpreter exits, it finishes what was submitted, says BYE, closes its sockets, stops the local
worker it owns, and exits. ``break_executor`` is the one place that fails every pending future.

Threads and locks (the client process)
--------------------------------------
Threads, and what each may touch:

* **User threads** (submit, map, result, shutdown, callbacks): ``Handle`` (_handle: its ``submissions`` deque and
  flags under ``Handle.lock``; ``addresses``, a tuple replaced whole under it by either thread, read
  without it), their futures (each future's condition), the executor's ``CallEncoder`` and ``_tracebacks``' record of sent code (dicts read and
  written without a lock: under the GIL a race costs one more pickling, never a wrong one), and, on the
  embedded worker's caller path (_caller), the scheduler, the lanes (their ``MemfdStore`` too) and
  the loop steps ``dispatch_tasks``, ``Embedded.receive`` and ``break_executor``, only while holding
  ``Engine.lock``.
  ``may_read``/``send`` read the scheduler's counts without it, as hints that are checked again with it.
  Nothing else of the I/O thread's: ``workers()`` is a request the I/O thread answers with a snapshot
  (``workers_snapshot``), or, once it has stopped, the last one it published.
  Also the executor's ``RepeatedBuffers`` (_reuse: dicts read and written without a lock; a race costs
  a digest or one plain send, never a wrong name) and an unordered map's queue (a ``SimpleQueue`` that
  the done-callbacks of its futures feed from whichever thread settles them).
* **The I/O thread** (``Engine``): every ZeroMQ socket, the selector, the fleet and its connections, the
  scheduler, the lanes; it resolves futures. It holds ``Engine.lock`` except while it waits for input.
* **libzmq's I/O thread** (one context per executor), pyzmq's ZAP authenticator thread when listening
  with keys, a short-lived probe thread per unreachable endpoint (_connection: it only resolves and
  connects a plain socket), and without epoll (macOS, the BSDs, ``ZMQEXECUTOR_PORTABLE=1``)
  ``zmqexecutor-readiness`` (_readiness.WatchedSet), which only polls the lanes' sockets and makes a
  pipe readable. The caller path is closed then. Helper threads of a digest (_serialize.digest, for a
  buffer of 8 MiB or more): started and joined within that one call, each hashes its own pieces.
* **The metrics HTTP thread** (``zmqexecutor.metrics.serve_metrics``, only when asked for): at each
  scrape it asks for ``workers()`` like any user thread and reads the scheduler's plain counters
  (``added``, ``retried``, the ``round_trips`` histogram) without a lock: a scrape may be one task
  behind, never torn, since each is one int or a list copied whole.

Locks, in the order they may be taken (never the other way round):

1. ``Engine.lock``: the I/O thread's, except while it waits. A user thread takes it without blocking
   to send or begin reading (so it never waits for the I/O thread), and blocking only once it is the
   reader, while the I/O thread has its interest in the lanes paused.
2. ``CallerPath.bell_lock`` (reentrant): a reader's leaving against ``close()``.
3. A future's condition (``SafeCondition``, a C RLock) and ``Handle.changed``: taken to settle a future
   or announce workers; user code runs only in callbacks, after it is released.
4. ``Handle.lock`` and ``Wakeup``'s lock: leaves; nothing is taken while they are held.
"""

from __future__ import annotations

import collections
import logging
import selectors
import threading
import time
import weakref
from typing import Any, Optional, Protocol, Union

import zmq

from .._wire import _protocol as proto
from .._wire._errors import BrokenWorkerPool
from .._wire._protocol import Kind
from .._wire._sockets import allow_descriptors_for, roomy_context
from ._caller import CallerPath
from ._connection import Connection, WorkerInfo, connecting
from ._dialin import DialInPort
from ._fleet import Fleet
from ._local import Embedded, LocalWorker, NoLocalWorker
from ._outcomes import Outcomes, copy_error, fail
from ._scheduler import Scheduler, Task
from ._settings import Settings

logger = logging.getLogger("zmqexecutor")

# After a dialled-in worker's connection closed, every dialled worker is pinged again this soon, as
# the ROUTER may still have known the identity when the first ping went out.
RECHECK_AFTER_DISCONNECT = 0.05


class Request(Protocol):
    """What another thread asks of the I/O thread besides tasks (_handle): applied there, in order."""

    def apply(self, engine: "Engine") -> None: ...


class HandleView(Protocol):
    """What the engine uses of its executor's handle (_handle.Handle)."""

    lock: Any
    addresses: tuple[str, ...]  # the bound endpoints, in the user's order
    submissions: "collections.deque[Union[Task, Request]]"
    wakeup: Any
    broken: Optional[BaseException]
    exiting: bool
    forked_from: Optional[int]
    shutdown_requested: bool

    def executor_ref(self) -> Any: ...

    def workers_changed(self) -> None: ...

    def endpoints_removed(self, removed: list[str]) -> None: ...

    def engine_finished(self, workers: tuple[WorkerInfo, ...]) -> None: ...


class Engine(threading.Thread):
    """The I/O thread of one executor."""

    def __init__(self, handle: HandleView, addresses: list[str], settings: Settings,
                 local_worker: Optional[LocalWorker]) -> None:
        super().__init__(name="zmqexecutor-io", daemon=True)
        self.handle = handle
        self.settings = settings
        self.scheduler = Scheduler(max_retries=settings.max_retries, max_in_flight=settings.max_in_flight)
        self.outcomes = Outcomes(self.scheduler, settings, local=local_worker is not None,
                                 break_executor=self.break_executor)
        # The worker it embeds, or one that does nothing: the loop below has no case of its own for it.
        self.local: Union[Embedded, NoLocalWorker] = (
            NoLocalWorker() if local_worker is None else Embedded(local_worker, self.scheduler, self.outcomes))
        # Sockets are made and closed by this thread alone (in run): the fleet makes them there.
        self.context: zmq.Context[Any] = roomy_context()
        allow_descriptors_for(len(addresses))
        self.selector = selectors.DefaultSelector()
        self.fleet = Fleet(addresses, settings, self.context, self.selector, local=local_worker is not None)
        self.connections = self.fleet.connections
        self.opened = threading.Event()  # set once the sockets are open (or failed to: open_error)
        self.open_error: Optional[BaseException] = None
        self.next_tick = 0.0
        self.shutting_down = False
        self.stopping_workers = False
        # Held by this thread except while it waits for input; a caller's thread that gets it may send
        # its own task and read replies (_caller). Taken without blocking by them, so never a wait.
        self.lock = threading.Lock()
        self.woke = time.monotonic()  # when the loop last stopped waiting for input
        self.caller = CallerPath(self)

    # The loop -------------------------------------------------------------------------------------

    def run(self) -> None:
        self.lock.acquire()
        try:
            try:
                self.open_connections()
            except OSError as exc:  # listen= cannot be bound: the constructor raises it
                self.open_error = exc
                self.break_executor(exc)
                return
            finally:
                self.opened.set()
            self.local.start_caller_path(self.caller, self.selector)
            while True:
                self.wait_for_input()
                self.receive_replies()
                self.read_connection_events()
                self.take_submissions()
                self.dispatch_tasks()
                if self.fleet.removing:
                    self.retire_removed()
                self.tick()
                self.expire_waiting_tasks()
                if self.is_finished():
                    break
        except BaseException as exc:
            logger.exception("the zmqexecutor I/O thread failed")
            self.break_executor(BrokenWorkerPool(f"the executor's I/O thread failed: {exc!r}"))
        finally:
            self.handle.engine_finished(self.workers_snapshot())
            self.caller.stop()
            self.lock.release()
            self.close()

    def wait_for_input(self) -> None:
        self.scheduler.turn_took(time.monotonic() - self.woke)
        self.fleet.look_at_sent()
        timeout = 0.0
        if not self.fleet.has_input():
            deadlines = [self.next_tick]
            expiry = self.scheduler.next_expiry(self.settings.connect_timeout)
            if expiry is not None:
                deadlines.append(expiry)
            timeout = max(0.0, min(deadlines) - time.monotonic())
        self.lock.release()
        try:
            ready = self.selector.select(timeout)
        finally:
            self.lock.acquire()
        self.woke = time.monotonic()
        self.fleet.take_ready(ready)

    # Steps ----------------------------------------------------------------------------------------

    def open_connections(self) -> None:
        s = self.settings
        self.selector.register(self.handle.wakeup.fileno(), selectors.EVENT_READ, None)
        self.local.open(self.fleet, s)
        self.fleet.open()

    def receive_replies(self) -> None:
        # Each source reads a bounded amount and hands it to handle_message or handle_dialled.
        unread = self.fleet.unread
        for source in list(unread):
            if not source.take_input(self):
                unread.discard(source)

    def handle_message(self, conn: Connection, frames: list[Any]) -> None:
        conn.heard_from()
        proto.expect_frames(frames, 1)
        # Only the answer to our HELLO may speak another protocol version, before the session is up:
        # that is how a worker of another version reports the mismatch. Anything else is malformed.
        header = proto.decode_header(frames[0], any_version=True)
        if header.kind == Kind.WELCOME and (header.version == proto.PROTOCOL_VERSION or not conn.ready):
            self.welcome(conn, header, frames)
            return
        if header.version != proto.PROTOCOL_VERSION:
            raise proto.ProtocolError(f"protocol version {header.version} after the handshake")
        now = time.monotonic()
        for kind, ident, rest in proto.split(header, frames):
            if self.outcomes.reply(conn.load, kind, ident, rest, now):
                continue
            if kind == Kind.REJECTED:
                if conn.ready:
                    self.lose(conn, proto.decode_reason(rest))
            elif kind == Kind.EXITED:
                self.local.process_exited(conn, proto.decode_exited(rest), stopping=self.stopping_workers)
            elif kind == Kind.DRAINING:
                conn.draining()
            elif kind == Kind.PACE:
                self.scheduler.paced(conn.load, ident / 1e6)
            elif kind != Kind.PONG:
                raise proto.ProtocolError(f"unexpected {kind.name} from a worker")

    def handle_dialled(self, port: DialInPort, frames: list[Any]) -> None:
        routing_id, body = frames[0].bytes, frames[1:]
        try:
            proto.expect_frames(body, 1)
            if proto.decode_header(body[0], any_version=True).kind == Kind.JOIN:
                rejoined = self.fleet.joined(port, routing_id, body)
                if rejoined is not None:  # a new connection: what it had in flight went with the old one
                    self.lose(rejoined, "it reconnected")
                return
            joined = port.workers.get(routing_id)
            if joined is None:
                logger.debug("ignored a message from a worker that has not joined")
                return
            self.handle_message(joined, body)
        except proto.ProtocolError as exc:
            logger.warning("dropped a malformed message from a worker that dialled in: %s", exc)

    def welcome(self, conn: Connection, header: proto.Header, frames: list[Any]) -> None:
        was_ready = conn.ready
        lost = conn.welcome(header, frames)
        if lost is not None:
            self.outcomes.worker_lost(conn, lost, retry=not self.stopping_workers)
        if conn.ready and (lost is not None or not was_ready):
            conn.take_tasks_from(self.scheduler, draining=conn in self.fleet.removing)
        elif not conn.ready and was_ready:
            self.scheduler.detach(conn.load, "incompatible")
        self.handle.workers_changed()

    def read_connection_events(self) -> None:
        if self.fleet.unread_events:
            lost, someone_left = self.fleet.departures()
            for conn, why in lost:
                self.lose(conn, why)
            if someone_left:
                # Again soon: the ROUTER may not have dropped the identity yet when the event comes.
                self.next_tick = min(self.next_tick, time.monotonic() + RECHECK_AFTER_DISCONNECT)

    def lose(self, conn: Connection, why: str) -> None:
        self.handle.workers_changed()
        if conn.may_hold_tasks():
            self.outcomes.worker_lost(conn, why, retry=not self.stopping_workers)
        if not self.fleet.gone(conn):
            conn.lost()

    def take_submissions(self) -> None:
        self.handle.wakeup.clear()
        submissions = self.handle.submissions
        while submissions:
            submissions.popleft().apply(self)
        if not self.shutting_down and (self.handle.exiting or self.handle.executor_ref() is None):
            self.shutting_down = True

    def dispatch_tasks(self) -> None:
        batches, too_large = self.scheduler.next_batches(time.monotonic())
        for task, load in too_large:
            self.outcomes.too_large(task, load)
        for load, batch in batches:
            # A connection (or a lane of the embedded worker) that disconnected since its last
            # message: an event follows.
            if not load.owner.send_tasks(batch):
                self.scheduler.unsent(load, batch)

    def tick(self) -> None:
        now = time.monotonic()
        if now < self.next_tick:
            return
        self.next_tick = now + self.local.check_interval(self.settings.heartbeat)
        for conn, why in self.fleet.beats(now):
            self.lose(conn, why)
        self.outcomes.expire_unmet(now)
        problem = self.local.revive(self.connections, self.stopping_workers)
        if problem is not None:
            self.break_executor(BrokenWorkerPool(problem))

    def retire_removed(self) -> None:
        removed = self.fleet.retire_removed(self.scheduler)
        if removed:
            self.handle.endpoints_removed(removed)
            self.handle.workers_changed()

    def expire_waiting_tasks(self) -> None:
        if self.scheduler.backlog and not self.scheduler.has_ready_worker():
            port = self.fleet.port
            self.outcomes.expire(self.connections, self.fleet.addresses,
                                 listening=None if port is None else port.address)

    def is_finished(self) -> bool:
        if self.handle.broken is not None:
            return True
        return self.shutting_down and not self.scheduler.waiting and self.scheduler.in_flight == 0

    def workers_snapshot(self) -> tuple[WorkerInfo, ...]:
        """What ``workers()`` shows: the endpoints in the user's order, then the workers that dialled in."""
        seen = {info.endpoint: info for info in (conn.snapshot() for conn in self.connections)}
        bound = [seen.pop(address) if address in seen else connecting(address) for address in self.handle.addresses]
        return tuple(bound + list(seen.values()))

    # Failure and closing ----------------------------------------------------------------------------

    def break_executor(self, error: BaseException) -> None:
        """Mark the executor broken and fail every future it still holds, queued or in flight."""
        with self.handle.lock:
            if self.handle.broken is None:
                self.handle.broken = error
        self.take_submissions()
        loads = [conn.load for conn in self.connections] + self.local.loads()
        tasks = [task for load in loads for task in self.scheduler.take_inflight(load)]
        for task in tasks + self.scheduler.take_all():
            fail(task, copy_error(error))

    def close(self) -> None:
        try:
            self.fleet.close()
            self.selector.close()
            self.context.term()
        finally:
            self.local.close()
            self.caller.close()
            self.handle.wakeup.close()
            live_engines.discard(self)


# The engines whose threads run, for the interpreter-exit and fork hooks (_handle).
live_engines: "weakref.WeakSet[Engine]" = weakref.WeakSet()
