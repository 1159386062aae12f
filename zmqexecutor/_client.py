"""The client engine: one I/O thread per executor that owns every socket and resolves every future.

Data flow::

    user threads                                   I/O thread                                  workers
    ------------                                   ----------                                  -------
    submit(fn, *args)
      pickle (in the caller's thread)
      |
      +--> Shared.submissions (deque) --+--> backlog (deque of _Task; Future.cancel() works here)
      +--> Wakeup.wake() (a pipe byte)  |         |  dispatch: round-robin over endpoints with credit
                                                  v
                                        _Endpoint.inflight  ---- TASK ---->  DEALER per endpoint
                                                  ^
                                                  +--- RESULT / EXCEPTION / CRASHED <-- resolve Future

Liveness: every heartbeat interval the thread PINGs each ready worker (the worker's supervisor, which
runs no user code, answers) and re-sends HELLO to each worker it is still waiting for. A worker is lost
when its connection closes (a libzmq monitor event; libzmq's own heartbeats close a connection whose
peer went silent) or when a PING stays unanswered for ``worker_timeout``. Its tasks in flight go back to
the front of the backlog, to be sent again, unless they have been lost ``max_retries`` times already.
A task is resolved only by the endpoint it is in flight on, once, so late and duplicate replies fall
through.

The thread holds the executor only weakly: when the executor is shut down, garbage collected, or the
interpreter exits, it finishes what was submitted, says BYE to the workers, closes its sockets, stops
the local worker it owns, and exits. Anything that breaks the engine goes through ``break_executor``,
the one place that fails every pending future.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from concurrent.futures import Future
from typing import Any, Callable, NamedTuple, Optional, Union

import zmq

from . import _protocol as proto
from ._errors import (
    BrokenWorkerPool,
    MessageTooLargeError,
    SecurityError,
    NoWorkersError,
    TaskCrashedError,
    VersionMismatchError,
    WorkerLostError,
)
from ._local import LocalWorker
from ._protocol import Kind
from ._security import HANDSHAKE_FAILURE_EVENTS, HANDSHAKE_FAILURES, ClientKeys, secure_client_socket

logger = logging.getLogger("zmqexecutor")
# What tasks print on their workers, forwarded here (INFO); configure this logger to see it.
task_logger = logging.getLogger("zmqexecutor.task")

# Tasks kept in flight on a worker beyond its slots, so that a slot that frees up finds its next task
# already there instead of waiting a round trip. More hides latency better, but tasks sent ahead can
# no longer be cancelled and may wait behind a slow task while another worker sits idle.
PREFETCH_PER_SLOT = 1

# Most messages read from one socket per loop turn, so that one busy worker cannot starve the others
# or the submission queue.
RECV_BATCH = 256

# Heartbeats sent per worker_timeout: enough that a few lost or late ones never look like a dead worker.
HEARTBEATS_PER_TIMEOUT = 4

# Reconnection attempts to a worker that is down start this often and back off up to the maximum.
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 1000
# The local worker binds a moment after we connect: retry often, without backing off, so the first
# task does not wait out a long back-off interval.
LOCAL_RECONNECT_IVL_MS = 10

# How long closing sockets may spend flushing the final BYE.
CLOSE_LINGER_MS = 200

# While the engine owns a local worker it looks at it at least this often.
LOCAL_CHECK_INTERVAL = 1.0

# A local worker that dies is started again, its tasks retried like those of any lost worker; but one
# that died this many times within the window is being killed on purpose or cannot run here, and
# restarting it forever would hide that: the executor breaks instead.
LOCAL_RESTARTS = 3
LOCAL_RESTART_WINDOW = 60.0


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


class Shared:
    """What user threads and the I/O thread both touch; guarded by ``lock``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.submissions: collections.deque[Union[_Task, _ShutdownRequest, _StopWorkersRequest]] = collections.deque()
        self.wakeup = Wakeup()
        self.shutdown = False
        self.broken: Optional[BaseException] = None
        self.exiting = False  # set at interpreter exit


class _ShutdownRequest:
    __slots__ = ("cancel_futures",)

    def __init__(self, cancel_futures: bool) -> None:
        self.cancel_futures = cancel_futures


class _StopWorkersRequest:
    __slots__ = ("signum",)

    def __init__(self, signum: int) -> None:
        self.signum = signum


class _Task:
    __slots__ = ("ident", "future", "frames", "size", "queued_at", "started", "lost_on")

    def __init__(self, ident: int, future: Future[Any], frames: list[Any], size: int) -> None:
        self.ident = ident
        self.future = future
        self.frames = frames
        self.size = size
        self.queued_at = time.monotonic()
        self.started = False
        self.lost_on: list[str] = []


class WorkerInfo(NamedTuple):
    """A snapshot of one worker endpoint as this executor sees it (``ZMQExecutor.workers()``)."""

    endpoint: str
    state: str  # "connecting", "ready" or "incompatible"
    slots: int
    in_flight: int
    completed: int
    lost: int
    host: Optional[str]
    pid: Optional[int]
    instance: Optional[str]
    error: Optional[str]


class _Endpoint:
    __slots__ = ("address", "socket", "monitor", "state", "slots", "capacity", "inflight", "instance",
                 "info", "error", "in_ready_queue", "awaiting_since", "next_beat", "completed", "lost")

    CONNECTING = "connecting"
    READY = "ready"
    INCOMPATIBLE = "incompatible"

    def __init__(self, address: str, sock: zmq.Socket[Any], monitor: zmq.Socket[Any]) -> None:
        self.address = address
        self.socket = sock
        self.monitor = monitor
        self.state = self.CONNECTING
        self.slots = 0
        self.capacity = 0
        self.inflight: dict[int, _Task] = {}
        self.instance: Optional[str] = None
        self.info: dict[str, Any] = {}
        self.error: Optional[BaseException] = None
        self.in_ready_queue = False
        # When the oldest unanswered heartbeat was sent; None while the worker has answered since.
        self.awaiting_since: Optional[float] = None
        self.next_beat = 0.0
        self.completed = 0
        self.lost = 0

    def snapshot(self) -> WorkerInfo:
        host, pid = self.info.get("host"), self.info.get("pid")
        return WorkerInfo(self.address, self.state, self.slots, len(self.inflight), self.completed, self.lost,
                          host if isinstance(host, str) else None, pid if isinstance(pid, int) else None,
                          self.instance, None if self.error is None else str(self.error))


_task_ids = itertools.count(1)


def next_task_id() -> int:
    return next(_task_ids)


_MONITORED_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILURE_EVENTS


class Engine(threading.Thread):
    """The I/O thread of one executor."""

    def __init__(
        self,
        executor_ref: Callable[[], Any],
        shared: Shared,
        endpoints: list[str],
        *,
        init_blob: bytes,
        max_tasks_per_child: Optional[int],
        max_in_flight: Optional[int],
        connect_timeout: Optional[float],
        worker_timeout: float,
        max_retries: int,
        max_message_size: int,
        keys: Optional[ClientKeys],
        local_worker: Optional[LocalWorker],
    ) -> None:
        super().__init__(name="zmqexecutor-io", daemon=True)
        self.executor_ref = executor_ref
        self.shared = shared
        self.addresses = endpoints
        self.init_blob = init_blob
        self.max_tasks_per_child = max_tasks_per_child
        self.max_in_flight = max_in_flight
        self.connect_timeout = connect_timeout
        self.worker_timeout = worker_timeout
        self.heartbeat = worker_timeout / HEARTBEATS_PER_TIMEOUT
        self.max_retries = max_retries
        self.max_message_size = max_message_size
        self.keys = keys
        self.local_worker = local_worker
        self.local_restarts: list[float] = []
        self.client_id = f"zx-{uuid.uuid4().hex}".encode()
        self.backlog: collections.deque[_Task] = collections.deque()
        self.ready: collections.deque[_Endpoint] = collections.deque()
        self.endpoints: list[_Endpoint] = []
        self.by_socket: dict[zmq.Socket[Any], _Endpoint] = {}
        self.by_monitor: dict[zmq.Socket[Any], _Endpoint] = {}
        self.in_flight = 0
        self.shutting_down = False
        self.stopping_workers = False
        self.versions = proto.local_versions()

    # The loop -------------------------------------------------------------------------------------

    def run(self) -> None:
        self.context = zmq.Context()
        try:
            self.open_sockets()
            poller = zmq.Poller()
            for ep in self.endpoints:
                poller.register(ep.socket, zmq.POLLIN)
                poller.register(ep.monitor, zmq.POLLIN)
            poller.register(self.shared.wakeup.fileno(), zmq.POLLIN)
            while True:
                events = dict(poller.poll(self.poll_timeout()))
                self.receive_replies([ep for ep in self.endpoints if ep.socket in events])
                self.read_connection_events([ep for ep in self.endpoints if ep.monitor in events])
                self.take_submissions()
                self.check_liveness()
                self.send_heartbeats()
                self.dispatch_tasks()
                self.expire_waiting_tasks()
                self.watch_local_worker()
                if self.is_finished():
                    break
        except BaseException as exc:
            logger.exception("the zmqexecutor I/O thread failed")
            self.break_executor(BrokenWorkerPool(f"the executor's I/O thread failed: {exc!r}"))
        finally:
            self.close()

    def poll_timeout(self) -> int:
        now = time.monotonic()
        timeouts = [min(ep.next_beat for ep in self.endpoints) - now]
        if self.local_worker is not None:
            timeouts.append(LOCAL_CHECK_INTERVAL)
        if self.backlog and self.connect_timeout is not None and not self.ready_endpoints():
            timeouts.append(self.connect_timeout - (now - self.backlog[0].queued_at))
        return max(0, int(min(timeouts) * 1000) + 1)

    # Steps ----------------------------------------------------------------------------------------

    def open_sockets(self) -> None:
        self.hello = proto.encode_hello(
            dict(self.versions, host=socket.gethostname(), pid=os.getpid(),
                 max_tasks_per_child=self.max_tasks_per_child, timeout=self.worker_timeout,
                 max_message_size=self.max_message_size),
            self.init_blob,
        )
        for address in self.addresses:
            sock = self.context.socket(zmq.DEALER)
            sock.setsockopt(zmq.ROUTING_ID, self.client_id)
            # Credit bounds what is queued; a high-water mark would only drop or block silently.
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            # Queue nothing for a worker we are not connected to: a send then fails at once, and
            # what would have waited in a dead connection's pipe stays in our backlog instead.
            sock.setsockopt(zmq.IMMEDIATE, 1)
            # libzmq's own heartbeats close a connection whose peer stopped answering (a cut link, a
            # stopped process), so that it reconnects as soon as the peer is back.
            sock.setsockopt(zmq.HEARTBEAT_IVL, max(1, int(self.heartbeat * 1000)))
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, int(self.worker_timeout * 1000)))
            if self.local_worker is not None:
                sock.setsockopt(zmq.RECONNECT_IVL, LOCAL_RECONNECT_IVL_MS)
                sock.setsockopt(zmq.RECONNECT_IVL_MAX, 0)
            else:
                sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
                sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
            # A worker (or an impostor) sending a bigger frame is disconnected by libzmq unread.
            sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_size)
            if self.keys is not None:
                secure_client_socket(sock, self.keys, address)
            monitor = sock.get_monitor_socket(_MONITORED_EVENTS)
            sock.connect(address)
            ep = _Endpoint(address, sock, monitor)
            self.endpoints.append(ep)
            self.by_socket[sock] = ep
            self.by_monitor[monitor] = ep

    def receive_replies(self, endpoints: list[_Endpoint]) -> None:
        for ep in endpoints:
            for _ in range(RECV_BATCH):
                try:
                    frames = ep.socket.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                ep.awaiting_since = None
                try:
                    self.handle_reply(ep, frames)
                except proto.ProtocolError as exc:
                    logger.warning("dropped a malformed message from %s: %s", ep.address, exc)

    def handle_reply(self, ep: _Endpoint, frames: list[Any]) -> None:
        proto.expect_frames(frames, 1)
        # Only the answer to our HELLO may speak another protocol version, before the session is up:
        # that is how a worker of another version reports the mismatch. Anything else is malformed.
        header = proto.decode_header(frames[0], any_version=True)
        if header.kind == Kind.WELCOME and (header.version == proto.PROTOCOL_VERSION or ep.state != _Endpoint.READY):
            self.handle_welcome(ep, header, frames)
            return
        if header.version != proto.PROTOCOL_VERSION:
            raise proto.ProtocolError(f"protocol version {header.version} after the handshake")
        if header.kind == Kind.PONG:
            return
        if header.kind == Kind.REJECTED:
            if ep.state == _Endpoint.READY:
                self.lose_endpoint(ep, proto.decode_reason(frames[1:]))
            return
        if header.kind == Kind.OUTPUT:
            if header.ident in ep.inflight:
                self.log_output(ep, header.ident, proto.decode_output(frames[1:]))
            return
        task = ep.inflight.pop(header.ident, None)
        if task is None:
            logger.debug("ignored a late or duplicate %s for task %d from %s", header.kind.name, header.ident, ep.address)
            return
        self.in_flight -= 1
        ep.completed += 1
        self.offer(ep)
        if header.kind == Kind.RESULT:
            self.resolve_result(task, frames[1:])
        elif header.kind == Kind.EXCEPTION:
            task.future.set_exception(proto.decode_exception(frames[1:], endpoint=ep.address))
        elif header.kind == Kind.CRASHED:
            task.future.set_exception(self.crash_error(ep, proto.decode_crash(frames[1:])))
        elif header.kind == Kind.INIT_FAILED:
            cause = proto.decode_exception(frames[1:], endpoint=ep.address)
            error = BrokenWorkerPool("A task process initializer failed, the executor is not usable anymore")
            error.__cause__ = cause
            task.future.set_exception(error)
            self.break_executor(error)
        elif header.kind == Kind.DROPPED:
            task.future.set_exception(BrokenWorkerPool(proto.decode_reason(frames[1:])))
        else:
            raise proto.ProtocolError(f"unexpected {header.kind.name} from a worker")

    def handle_welcome(self, ep: _Endpoint, header: proto.Header, frames: list[Any]) -> None:
        if header.version != proto.PROTOCOL_VERSION:
            info: dict[str, Any] = {"protocol": header.version}
        else:
            info = proto.decode_welcome(frames)
        problem = proto.version_mismatch(self.versions, info, us="client", them=f"worker {ep.address}")
        if problem is None and not info.get("accepted", False):
            problem = str(info.get("reason") or "the worker refused the handshake")
        if problem is not None:
            logger.error("cannot use worker %s: %s", ep.address, problem)
            if ep.state == _Endpoint.READY:
                self.lose_endpoint(ep, "it was replaced by an incompatible worker")
            ep.state = _Endpoint.INCOMPATIBLE
            ep.error = VersionMismatchError(f"cannot use worker {ep.address}: {problem}")
            return
        if ep.state == _Endpoint.READY:
            if info["instance"] == ep.instance:
                return  # the answer to a HELLO repeated while we waited
            self.lose_endpoint(ep, "it restarted")
        if ep.instance is not None and ep.instance != info["instance"]:
            logger.warning("worker %s restarted (instance %s -> %s)", ep.address, ep.instance, info["instance"])
        ep.info = info
        ep.instance = info["instance"]
        ep.slots = info["slots"]
        ep.capacity = ep.slots * (1 + PREFETCH_PER_SLOT)
        ep.state = _Endpoint.READY
        ep.error = None
        logger.debug("worker %s ready with %d slots", ep.address, ep.slots)
        self.offer(ep)

    def log_output(self, ep: _Endpoint, task_id: int, output: dict[str, Any]) -> None:
        tag = f"[{ep.address} pid {output.get('pid')}]"
        for stream in ("stdout", "stderr"):
            text = output[stream].rstrip("\n")
            if text:
                lines = "\n".join(f"{tag} {line}" for line in text.split("\n"))
                more = " (truncated)" if output.get("truncated") else ""
                task_logger.info("task %d %s%s:\n%s", task_id, stream, more, lines)

    def resolve_result(self, task: _Task, frames: list[Any]) -> None:
        try:
            value = proto.loads(frames)
        except Exception as exc:
            task.future.set_exception(exc)
        else:
            task.future.set_result(value)

    def crash_error(self, ep: _Endpoint, info: dict[str, Any]) -> TaskCrashedError:
        signal_name = info.get("signal")
        exitcode = info.get("exitcode")
        how = f"was killed by {signal_name}" if signal_name else f"exited with code {exitcode}"
        host, pid = info.get("host", "?"), info.get("pid", 0)
        message = (f"the task process (pid {pid} on host {host}, worker {ep.address}) {how} while running "
                   "this task; the worker replaced it")
        return TaskCrashedError(message, exitcode=exitcode, signal=signal_name, host=str(host),
                                pid=int(pid) if isinstance(pid, int) else 0, endpoint=ep.address)

    def read_connection_events(self, endpoints: list[_Endpoint]) -> None:
        for ep in endpoints:
            while True:
                try:
                    event = proto.read_monitor_event(ep.monitor, zmq.NOBLOCK)
                except zmq.Again:
                    break
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    if ep.state == _Endpoint.CONNECTING:
                        self.send(ep, self.hello)
                elif event in HANDSHAKE_FAILURES:
                    problem = HANDSHAKE_FAILURES[event]
                    if ep.error is None or str(ep.error) != problem:
                        logger.error("cannot connect to worker %s: %s", ep.address, problem)
                    ep.error = SecurityError(problem)
                elif event == zmq.EVENT_DISCONNECTED and ep.state == _Endpoint.READY:
                    self.lose_endpoint(ep, "the connection closed")

    def check_liveness(self) -> None:
        now = time.monotonic()
        for ep in self.endpoints:
            if (ep.state == _Endpoint.READY and ep.awaiting_since is not None
                    and now - ep.awaiting_since > self.worker_timeout):
                self.lose_endpoint(ep, f"no answer for {self.worker_timeout:g} s")

    def send_heartbeats(self) -> None:
        now = time.monotonic()
        for ep in self.endpoints:
            if now < ep.next_beat:
                continue
            ep.next_beat = now + self.heartbeat
            if ep.state == _Endpoint.READY:
                if self.send(ep, [proto.encode_header(Kind.PING)]) and ep.awaiting_since is None:
                    ep.awaiting_since = now
            elif ep.state == _Endpoint.CONNECTING:
                self.send(ep, self.hello)

    def send(self, ep: _Endpoint, frames: list[Any]) -> bool:
        try:
            ep.socket.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False  # not connected right now
        return True

    def lose_endpoint(self, ep: _Endpoint, why: str) -> None:
        """Give up on the tasks in flight on ``ep``: retry them elsewhere, or fail those out of retries."""
        inflight, ep.inflight = ep.inflight, {}
        self.in_flight -= len(inflight)
        ep.lost += 1
        ep.state = _Endpoint.CONNECTING
        ep.awaiting_since = None
        ep.next_beat = 0.0  # shake hands again at once
        logger.warning("lost worker %s (%s) with %d task(s) in flight", ep.address, why, len(inflight))
        now = time.monotonic()
        retry = []
        for task in sorted(inflight.values(), key=lambda t: t.ident):
            task.lost_on.append(ep.address)
            if self.stopping_workers or len(task.lost_on) > self.max_retries:
                lost_on = tuple(task.lost_on)
                task.future.set_exception(WorkerLostError(
                    f"the task was lost with {len(lost_on)} worker(s): {', '.join(lost_on)} "
                    f"(max_retries={self.max_retries}); last: {why}", lost_on))
            else:
                task.queued_at = now
                retry.append(task)
        self.backlog.extendleft(reversed(retry))

    def take_submissions(self) -> None:
        self.shared.wakeup.clear()
        submissions = self.shared.submissions
        while submissions:
            item = submissions.popleft()
            if isinstance(item, _Task):
                self.backlog.append(item)
            elif isinstance(item, _ShutdownRequest):
                self.shutting_down = True
                if item.cancel_futures:
                    self.cancel_backlog()
            else:
                self.stop_workers(item.signum)
        if not self.shutting_down and (self.shared.exiting or self.executor_ref() is None):
            self.shutting_down = True

    def cancel_backlog(self) -> None:
        kept = collections.deque(task for task in self.backlog if task.started)
        for task in self.backlog:
            if not task.started:
                task.future.cancel()
        self.backlog = kept

    def stop_workers(self, signum: int) -> None:
        self.stopping_workers = True
        self.fail_backlog(lambda: WorkerLostError("the task was waiting for a retry when the workers were stopped"))
        for ep in self.endpoints:
            if ep.state == _Endpoint.READY:
                self.send(ep, [proto.encode_header(Kind.TERMINATE, signum)])

    def offer(self, ep: _Endpoint) -> None:
        if ep.state == _Endpoint.READY and not ep.in_ready_queue and len(ep.inflight) < ep.capacity:
            ep.in_ready_queue = True
            self.ready.append(ep)

    def ready_endpoints(self) -> bool:
        return any(ep.state == _Endpoint.READY for ep in self.endpoints)

    def dispatch_tasks(self) -> None:
        while self.backlog and self.ready:
            if self.max_in_flight is not None and self.in_flight >= self.max_in_flight:
                return
            ep = self.ready.popleft()
            ep.in_ready_queue = False
            if ep.state != _Endpoint.READY or len(ep.inflight) >= ep.capacity:
                continue
            task = self.backlog.popleft()
            limit = ep.info.get("max_message_size")
            if isinstance(limit, int) and task.size > limit:
                self.fail_task(task, MessageTooLargeError(
                    f"the task is {task.size} bytes, more than worker {ep.address} accepts "
                    f"(its --max-message-size is {limit})"))
                self.offer(ep)
                continue
            if not task.started:
                if not task.future.set_running_or_notify_cancel():
                    self.offer(ep)
                    continue
                task.started = True
            if not self.send(ep, [proto.encode_header(Kind.TASK, task.ident), *task.frames]):
                # Disconnected since its last message: the connection event will follow.
                self.backlog.appendleft(task)
                continue
            ep.inflight[task.ident] = task
            self.in_flight += 1
            self.offer(ep)

    def expire_waiting_tasks(self) -> None:
        if not self.backlog or self.ready_endpoints():
            return
        if self.endpoints and all(ep.state == _Endpoint.INCOMPATIBLE for ep in self.endpoints):
            errors = "; ".join(str(ep.error) for ep in self.endpoints)
            self.fail_backlog(lambda: VersionMismatchError(errors))
            return
        if self.connect_timeout is None:
            return
        now = time.monotonic()
        if now - self.backlog[0].queued_at < self.connect_timeout:
            return
        reasons = "".join(f"; {ep.address}: {ep.error}" for ep in self.endpoints if ep.error is not None)
        message = (f"no worker became reachable within connect_timeout={self.connect_timeout:g} s "
                   f"(endpoints: {', '.join(self.addresses)}){reasons}")
        waiting = self.backlog
        self.backlog = collections.deque(task for task in waiting if now - task.queued_at < self.connect_timeout)
        for task in waiting:
            if now - task.queued_at >= self.connect_timeout:
                self.fail_task(task, NoWorkersError(message))

    def watch_local_worker(self) -> None:
        worker = self.local_worker
        if worker is None:
            return
        code = worker.exit_code()
        if code is None:
            return
        now = time.monotonic()
        self.local_restarts = [t for t in self.local_restarts if now - t < LOCAL_RESTART_WINDOW]
        # One that never answered is not going to: its start-up fails, and its log on stderr says why.
        never_ready = all(ep.instance is None for ep in self.endpoints)
        if self.stopping_workers or never_ready or len(self.local_restarts) >= LOCAL_RESTARTS:
            often = f" ({len(self.local_restarts) + 1} times in {LOCAL_RESTART_WINDOW:g} s)" \
                if self.local_restarts else ""
            self.break_executor(BrokenWorkerPool(
                f"the executor's local worker process (pid {worker.pid}) exited unexpectedly with code "
                f"{code}{often}; the executor is not usable anymore"))
            return
        logger.warning("the local worker process (pid %d) exited unexpectedly with code %s; starting it again",
                       worker.pid, code)
        self.local_restarts.append(now)
        try:
            worker.start()
        except OSError as exc:
            self.break_executor(BrokenWorkerPool(
                f"the executor's local worker process exited with code {code} and could not be started "
                f"again: {exc}; the executor is not usable anymore"))

    def is_finished(self) -> bool:
        if self.shared.broken is not None:
            return True
        return self.shutting_down and not self.backlog and self.in_flight == 0

    # Failure -------------------------------------------------------------------------------------

    def fail_task(self, task: _Task, error: BaseException) -> None:
        if task.started or task.future.set_running_or_notify_cancel():
            task.future.set_exception(error)

    def fail_backlog(self, make_error: Callable[[], BaseException]) -> None:
        backlog, self.backlog = self.backlog, collections.deque()
        for task in backlog:
            self.fail_task(task, make_error())

    def break_executor(self, error: BaseException) -> None:
        """Mark the executor broken and fail every future it still holds, queued or in flight."""
        with self.shared.lock:
            if self.shared.broken is None:
                self.shared.broken = error
        self.take_submissions()
        self.fail_backlog(lambda: _copy_error(error))
        for ep in self.endpoints:
            inflight, ep.inflight = ep.inflight, {}
            for task in inflight.values():
                if not task.future.done():
                    task.future.set_exception(_copy_error(error))
        self.in_flight = 0

    # Closing -------------------------------------------------------------------------------------

    def close(self) -> None:
        try:
            for ep in self.endpoints:
                if ep.state == _Endpoint.READY:
                    self.send(ep, [proto.encode_header(Kind.BYE)])
                ep.socket.disable_monitor()
                ep.monitor.close(linger=0)
                ep.socket.close(linger=CLOSE_LINGER_MS)
            self.context.term()
        finally:
            if self.local_worker is not None:
                self.local_worker.stop()
            self.shared.wakeup.close()
            _live_engines.discard(self)


def _copy_error(error: BaseException) -> BaseException:
    # Each future gets its own exception object, so that tracebacks raised from one do not pile up
    # on the others.
    try:
        copy = type(error)(*error.args)
    except Exception:
        return error
    copy.__cause__ = error.__cause__
    return copy


# Interpreter exit: like the stdlib executors, finish submitted work before the interpreter goes away.
_live_engines: "weakref.WeakSet[Engine]" = weakref.WeakSet()
_global_shutdown = False


def register(engine: Engine) -> None:
    _live_engines.add(engine)


def is_interpreter_exiting() -> bool:
    return _global_shutdown


def _python_exit() -> None:
    global _global_shutdown
    _global_shutdown = True
    engines = list(_live_engines)
    for engine in engines:
        engine.shared.exiting = True
        engine.shared.wakeup.wake()
    for engine in engines:
        engine.join()


threading._register_atexit(_python_exit)  # type: ignore[attr-defined]
