"""The worker supervisor: owns one bound endpoint (or dials one client) and routes tasks to its task
processes.

Data flow::

    clients (DEALER, one per executor)
        |  HELLO  TASK or BATCH of TASKs  PING  TERMINATE  CANCEL  STATUS  DRAIN  BYE
        |                                 ^  WELCOME  PONG  REJECTED  STATUS_REPLY  DRAINING  JOIN
        v                                 |  RESULT EXCEPTION INIT_FAILED OUTPUT CRASHED DROPPED RETURNED
    +------------------ supervisor (one thread, never unpickles) -----|---- (a BATCH per client
    | front (_front): a ROUTER bound to the user's endpoint, or, with        per loop turn)
    |   --connect, a DEALER dialling the client's listen address (JOIN on each new connection)
    |   Sessions: client id -> handshake info + initializer pickle
    |   queue: tasks waiting for credit in a task process, first in first out
    |   TaskProcessPool: the processes, what each was given, crash accounting
    | Listener (a Unix socket in a private folder, _channel)
    +---------------------------------------------------------------------------------
        |  TASK or BATCH (renumbered with the supervisor's own ids), STOP
        v                                 ^  READY, RESULT EXCEPTION INIT_FAILED OUTPUT (or a BATCH)
    task processes (a Link each, _taskprocess): unpickle, run the user's code, pickle the reply

Started with ``--direct PATH`` (the embedded worker, by its executor), the task processes connect to
the client's Unix socket at PATH instead and exchange tasks with it directly; the supervisor then only
answers the client's HELLO and PINGs, starts, reaps and replaces processes, signals them on
TERMINATE, and sends EXITED (the process's counters) when one ends.

SIGTERM (or DRAIN, from ``zmqexecutor drain``, or the end of standard input with ``--exit-with-stdin``)
makes it drain: every client hears DRAINING, queued
tasks go back to their clients (RETURNED, sent elsewhere without counting a retry), and so do tasks
that arrive later; the running ones (and those already sent ahead to a task process) finish; then,
or after ``drain_timeout`` seconds, it exits 0. A second SIGTERM, or SIGINT, stops it at once. The
embedded worker does not drain: its executor stops it only when it has nothing running there.

Each loop turn reads both sockets until they would block (bounded), reaps dead task processes, hands
queued tasks to processes with credit, and sends each client its replies as one message. A process
that dies gets the task it was running (and any finished ones whose replies died with it) reported
as CRASHED; the tasks it had not started yet go back to the front of the queue; a replacement starts.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from typing import Any, Iterator, Optional

import zmq

from . import _protocol as proto
from ._errors import MessageTooLargeError, SecurityError
from ._front import BoundFront, DialFront, join_info
from ._protocol import Item, Kind
from ._security import DialKeys, Guard, worker_guard
from ._sessions import Sessions
from ._taskpool import MAX_STARTUP_FAILURES, TaskProcess, TaskProcessPool

logger = logging.getLogger("zmqexecutor.worker")

# How often the supervisor looks for a vanished parent and silent sessions when nothing happens.
PARENT_CHECK_INTERVAL = 0.5

# One message to a client carries at most this many replies and, beyond its first, this many bytes.
REPLY_BATCH = 256
REPLY_BATCH_BYTES = 1 << 20

# How long a draining worker waits for its running tasks by default, before it stops them.
DEFAULT_DRAIN_TIMEOUT = 30.0

# Forking is only known to be safe on Linux (macOS frameworks break in forked children).
_CAN_FORK_EARLY = sys.platform.startswith("linux")

_REPLIES = frozenset({Kind.RESULT, Kind.EXCEPTION, Kind.INIT_FAILED})


class Supervisor:
    """Owns the bound endpoint and the task processes; routes frames between them."""

    def __init__(self, bind: Optional[str], processes: int, *, parent_pid: Optional[int] = None,
                 secret_key_file: Optional[str] = None, allow: Optional[str] = None, direct: Optional[str] = None,
                 max_message_size: int = proto.DEFAULT_MAX_MESSAGE_SIZE,
                 drain_timeout: float = DEFAULT_DRAIN_TIMEOUT, connect: Optional[str] = None,
                 dial_keys: Optional[DialKeys] = None, idle_timeout: Optional[float] = None,
                 exit_with_stdin: bool = False) -> None:
        if (bind is None) == (connect is None):
            raise ValueError("a worker either binds an endpoint or connects to a client's, not both")
        self.bind = bind
        self.connect = connect
        self.dial_keys = dial_keys
        self.idle_timeout = idle_timeout
        self.idle_since = time.monotonic()
        self.exit_with_stdin = exit_with_stdin
        self.secret_key_file = secret_key_file
        self.allow = allow
        self.max_message_size = max_message_size
        self.guard: Optional[Guard] = None
        self.processes = processes
        self.parent_pid = parent_pid
        self.instance = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.endpoint = bind or connect
        self.sessions = Sessions()
        self.queue: collections.deque[tuple[bytes, int, Any]] = collections.deque()
        self.outbox: dict[bytes, list[Item]] = {}
        self.direct = direct
        # Relayed, the task processes connect to a socket in a folder of our own; direct, to the client's.
        self.private_dir = None if direct else tempfile.mkdtemp(prefix="zmqexecutor-worker-")
        self.pool = TaskProcessPool(direct or f"{self.private_dir}/tasks", multiprocessing.get_context("spawn"),
                                    direct=direct is not None)
        self.stopping = False
        self.drain_timeout = drain_timeout
        self.drain_requested = False  # by SIGTERM or DRAIN; taken up by the loop
        self.drain_deadline: Optional[float] = None  # draining since: until then
        self.orphaned = False
        self.started = time.monotonic()
        self.tally = {"done": 0, "failed": 0, "crashed": 0, "cancelled": 0}

    # The loop -------------------------------------------------------------------------------------

    def run(self) -> int:
        # The first task processes are forked before this process has any thread (libzmq's come with
        # the context below), which is safe and saves each of them the interpreter start-up and imports
        # that spawn costs. Replacements, started once threads exist, are spawned.
        if _CAN_FORK_EARLY:
            self.pool.start(self.processes, multiprocessing.get_context("fork"))
        self.context = zmq.Context()
        try:
            with _signals_to(self._on_signal) as signal_fd:
                self.start()
                self.serve(signal_fd)
            return 0
        except _GiveUp as exc:
            logger.error("%s", exc)
            return 1
        except SecurityError as exc:
            logger.error("refusing to run: %s", exc)
            return 2
        finally:
            self.close()

    def start(self) -> None:
        if self.secret_key_file is not None:
            self.guard = worker_guard(self.context, self.secret_key_file, self.allow or "")
        self.open_sockets()
        if self.guard is not None:
            self.guard.prove_strangers_are_rejected(self.front.endpoint)
        if not _CAN_FORK_EARLY:
            self.pool.start(self.processes)
        if self.guard is not None:
            security = f"CurveZMQ ({len(self.guard.allowed)} allowed client keys)"
        else:
            security = "CurveZMQ (the client's key pinned)" if self.dial_keys is not None else "none"
        logger.info("zmqexecutor worker ready: %s=%s processes=%d instance=%s pid=%d security=%s",
                    "connect" if self.connect else "endpoint", self.endpoint, self.processes, self.instance,
                    os.getpid(), security)

    def serve(self, signal_fd: int) -> None:
        poller = zmq.Poller()
        stdin = sys.stdin.fileno() if self.exit_with_stdin else None
        for sock in (self.front.socket, self.front.monitor, self.pool.listener, signal_fd, stdin):
            if sock is not None:
                poller.register(sock, zmq.POLLIN)
        registered: set[int] = set()
        next_check = 0.0
        limits_due: Optional[float] = None
        while not self.stopping:
            self.sync_sentinels(poller, registered)
            timeout = PARENT_CHECK_INTERVAL
            for due in (limits_due, self.drain_deadline):
                if due is not None:
                    timeout = min(timeout, max(0.0, due - time.monotonic()))
            events = dict(poller.poll(int(timeout * 1000)))
            if signal_fd in events:
                os.read(signal_fd, 4096)
            if stdin is not None and stdin in events and not os.read(stdin, 4096):
                poller.unregister(stdin)  # it stays readable at its end
                stdin = None
                if not self.request_drain("standard input closed (whoever started this worker is gone)"):
                    self.stopping = True
            self.front.connection_events()
            self.receive_from_processes()
            self.receive_from_clients()
            self.reap_processes([fd for fd in events if fd in self.pool.by_sentinel])
            self.drain()
            self.dispatch_tasks()
            self.send_replies()
            limits_due = self.pool.enforce_time_limits(time.monotonic())
            if self.drain_deadline is not None and (self.pool.idle() or time.monotonic() >= self.drain_deadline):
                self.stopping = True
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + PARENT_CHECK_INTERVAL
                self.expire_sessions()
                self.check_parent()
                self.check_idle()
            if not events and self.pool.listener is not None:  # a wait in vain: idle
                self.pool.listener.trim_buffers()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGTERM and self.request_drain("received SIGTERM"):
            return
        logger.info("received %s, stopping", signal.Signals(signum).name)
        self.stopping = True

    def sync_sentinels(self, poller: zmq.Poller, registered: set[int]) -> None:
        current = set(self.pool.by_sentinel)
        for fd in registered - current:
            poller.unregister(fd)
        for fd in current - registered:
            poller.register(fd, zmq.POLLIN)
        registered.clear()
        registered.update(current)

    # Steps ----------------------------------------------------------------------------------------

    def open_sockets(self) -> None:
        if self.connect is not None:
            join = join_info(self.instance, self.processes, os.getpid())
            self.front: BoundFront | DialFront = DialFront(
                self.context, self.connect, join=join, max_message_size=self.max_message_size, keys=self.dial_keys)
        else:
            assert self.bind is not None
            try:
                self.front = BoundFront(self.context, self.bind, max_message_size=self.max_message_size,
                                        guard=self.guard)
            except zmq.ZMQError as exc:
                raise _GiveUp(f"cannot bind {self.bind}: {exc}") from None
        self.endpoint = self.front.endpoint
        self.pool.open()

    def receive_from_clients(self) -> None:
        for client, frames in self.front.messages():
            try:
                self.handle_client_message(client, frames)
            except proto.ProtocolError as exc:
                logger.warning("dropped a malformed message from client %r: %s", client, exc)

    def handle_client_message(self, client: bytes, frames: list[Any]) -> None:
        proto.expect_frames(frames, 1)
        header = proto.decode_header(frames[0], any_version=True)
        if header.kind == Kind.HELLO:
            self.greet(client, header, frames)
            return
        if header.kind in (Kind.STATUS, Kind.DRAIN):
            if header.kind == Kind.DRAIN and self.request_drain("asked to drain"):
                self.drain()
            self.send_to_client(client, [proto.encode_header(Kind.STATUS_REPLY), proto.encode_json(self.status())])
            return
        if header.version != proto.PROTOCOL_VERSION:
            raise proto.ProtocolError(f"protocol version {header.version}, expected {proto.PROTOCOL_VERSION}")
        if header.kind not in (Kind.TASK, Kind.BATCH, Kind.PING, Kind.TERMINATE, Kind.CANCEL, Kind.BYE):
            raise proto.ProtocolError(f"unexpected {header.kind.name} from a client")
        tasks = proto.split(header, frames)
        session = self.sessions.get(client)
        if session is None:
            if header.kind != Kind.BYE:
                reason = "this worker has no session for the client (it restarted, or the session expired)"
                self.send_to_client(client, [proto.encode_header(Kind.REJECTED, tasks[0].ident),
                                             *proto.encode_reason(reason)])
            return
        session.last_seen = time.monotonic()
        if header.kind in (Kind.TASK, Kind.BATCH):
            for task in tasks:
                if task.kind != Kind.TASK or not task.frames:
                    raise proto.ProtocolError(f"a {task.kind.name} without a call among the tasks")
            if self.direct is not None:  # its processes take tasks from the embedding client only
                dropped = proto.encode_reason("this worker takes tasks only from the executor that embeds it")
                for task in tasks:
                    self.reply(client, Item(Kind.DROPPED, task.ident, dropped))
                return
            if self.drain_deadline is not None:  # sent before the client heard DRAINING: elsewhere
                for task in tasks:
                    self.reply(client, Item(Kind.RETURNED, task.ident, []))
                return
            self.queue.extend((client, task.ident, task.frames) for task in tasks)
        elif header.kind == Kind.PING:
            self.send_to_client(client, [proto.encode_header(Kind.PONG)])
        elif header.kind == Kind.TERMINATE:
            self.terminate_tasks_of(client, header.ident)
        elif header.kind == Kind.CANCEL:
            self.cancel_task(client, header.ident, proto.decode_cancel(frames[1:]))
        else:
            self.forget_session(client, "said goodbye")

    def greet(self, client: bytes, header: proto.Header, frames: list[Any]) -> None:
        welcome, info, init_blob = proto.answer_hello(header, frames, dict(
            slots=self.processes, instance=self.instance, host=self.host, pid=os.getpid(),
            max_message_size=self.max_message_size))
        # A client shakes hands again only after giving up on its tasks here: drop the old session.
        self.forget_session(client, "started a new session" if info is not None else "was refused")
        if info is not None:
            self.sessions.open(client, init_blob, info)
            logger.info("client %s connected (host %s, pid %s)", client.decode(errors="replace"),
                        info.get("host"), info.get("pid"))
        else:
            logger.warning("refused client %r: %s", client, proto.decode_json(welcome[1]).get("reason"))
        self.send_to_client(client, welcome)
        if info is not None and self.drain_deadline is not None:
            self.send_to_client(client, [proto.encode_header(Kind.DRAINING)])

    def status(self) -> dict[str, Any]:
        return dict(proto.local_versions(), slots=self.processes, busy=self.pool.busy(), queued=len(self.queue),
                    **self.tally, timed_out=self.pool.timed_out, clients=len(self.sessions),
                    uptime=time.monotonic() - self.started, draining=self.drain_requested,
                    instance=self.instance, host=self.host, pid=os.getpid(),
                    security="CurveZMQ" if self.guard is not None else "none")

    def forget_session(self, client: bytes, why: str) -> None:
        if not self.sessions.close(client):
            return
        kept = collections.deque(item for item in self.queue if item[0] != client)
        dropped = len(self.queue) - len(kept)
        self.queue = kept
        self.outbox.pop(client, None)
        logger.info("client %s %s; dropped its session and %d queued task(s)",
                    client.decode(errors="replace"), why, dropped)
        # Nobody waits for what its running tasks return anymore: stop them, freeing their slots.
        self.pool.signal_running(client, signal.SIGTERM, "because its client's session ended")
        self.pool.forget_client(client)

    def expire_sessions(self) -> None:
        for session in self.sessions.expired(time.monotonic()):
            self.forget_session(session.client, f"was silent for {session.expiry:g} s")

    def terminate_tasks_of(self, client: bytes, signum: int) -> None:
        reason = proto.encode_reason("the task was dropped before it started: its client stopped the workers")
        for item in self.queue:
            if item[0] == client:
                self.reply(client, Item(Kind.DROPPED, item[1], reason))
        self.queue = collections.deque(item for item in self.queue if item[0] != client)
        self.pool.signal_running(client, signal.SIGKILL if signum == signal.SIGKILL else signal.SIGTERM,
                                 "at its client's request")

    def cancel_task(self, client: bytes, ident: int, seq: Optional[int]) -> None:
        """Stop one task: relayed, ``ident`` is the client's task id; direct, the process's pid and
        ``seq`` which of the tasks the client sent it."""
        if self.direct is None:
            for item in self.queue:
                if item[0] == client and item[1] == ident:
                    self.queue.remove(item)
                    self.reply(client, Item(Kind.DROPPED, ident, proto.encode_reason("the task was cancelled")))
                    return
        if self.pool.kill_running(client, ident, seq):
            self.tally["cancelled"] += 1

    def send_to_client(self, client: bytes, frames: list[Any]) -> None:
        self.front.send(client, frames)

    def reply(self, client: bytes, item: Item) -> None:
        self.outbox.setdefault(client, []).append(item)

    def send_replies(self) -> None:
        outbox, self.outbox = self.outbox, {}
        for client, items in outbox.items():
            for batch in _batches(items):
                self.send_to_client(client, proto.encode_messages(batch))

    def receive_from_processes(self, ending: tuple[TaskProcess, ...] = ()) -> None:
        now = time.monotonic()
        for proc, items in self.pool.receive(ending):
            for item in items:
                if item.kind in _REPLIES:
                    self.finish_task(proc, item, now)
                elif item.kind == Kind.OUTPUT:
                    assignment = proc.assigned.get(item.ident)
                    if assignment is not None and self.sessions.get(assignment.client) is not None:
                        self.reply(assignment.client, Item(Kind.OUTPUT, assignment.task_id, item.frames))

    def finish_task(self, proc: TaskProcess, item: Item, now: float) -> None:
        assignment = self.pool.finished(proc, item.ident, now)
        if assignment is None:
            logger.error("task process %s replied for a task it was not given", proc.process.pid)
            return
        self.tally["done" if item.kind == Kind.RESULT else "failed"] += 1
        session = self.sessions.get(assignment.client)
        if session is not None:
            reply = Item(item.kind, assignment.task_id, item.frames)
            size = _size(reply)
            if session.max_message_size is not None and size > session.max_message_size:
                reply = self.too_large(assignment.task_id, size, session.max_message_size)
            self.reply(assignment.client, reply)
        else:
            logger.debug("dropped the result of task %d: its client's session is gone", assignment.task_id)
        if item.kind == Kind.INIT_FAILED:
            proc.closing = True
        if proc.closing and not proc.assigned and not proc.retiring:
            self.pool.retire(proc)

    def too_large(self, task_id: int, size: int, limit: int) -> Item:
        error = MessageTooLargeError(
            f"the task's result is {size} bytes, more than the client's max_message_size={limit}")
        return Item(Kind.EXCEPTION, task_id, proto.encode_exception(error, host=self.host, pid=os.getpid()))

    def reap_processes(self, sentinels: list[int]) -> None:
        if sentinels:  # first, what they sent just before they ended
            self.receive_from_processes(tuple(self.pool.by_sentinel[fd] for fd in sentinels))
        for fd in sentinels:
            replies, unstarted = self.pool.reap(fd, self.host)
            for client, item in replies:
                if self.sessions.get(client) is not None:
                    self.tally["crashed"] += item.kind == Kind.CRASHED
                    self.reply(client, item)
            self.queue.extendleft(reversed(unstarted))
            for info in self.pool.exits:  # direct: the client accounts for that process's tasks
                for session in self.sessions:
                    self.reply(session.client, Item(Kind.EXITED, info["pid"],
                                                    proto.encode_exited(host=self.host, **info)[1:]))
            self.pool.exits.clear()
            if self.pool.startup_failures >= MAX_STARTUP_FAILURES:
                raise _GiveUp(f"{self.pool.startup_failures} task processes in a row died before starting; giving up")

    def request_drain(self, why: str) -> bool:
        """Begin draining (the loop does it), unless already asked or embedded; False then."""
        if self.drain_requested or self.direct is not None:
            return False
        logger.info("%s: draining (running tasks get up to %g s); a second SIGTERM stops at once",
                    why, self.drain_timeout)
        self.drain_requested = True
        return True

    def drain(self) -> None:
        """Once asked to drain: tell every client, and give back what waits here."""
        if not self.drain_requested:
            return
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + self.drain_timeout
            for session in self.sessions:
                self.send_to_client(session.client, [proto.encode_header(Kind.DRAINING)])
            logger.info("draining: %d task(s) running; no more are taken", self.pool.busy())
        # Also what a crashed task process had not started yet, put back here by reap_processes.
        for client, task_id, _ in self.queue:
            self.reply(client, Item(Kind.RETURNED, task_id, []))
        self.queue.clear()

    def dispatch_tasks(self) -> None:
        if self.queue:
            for proc, items in self.pool.hand_out(self.queue, self.sessions):
                self.pool.send(proc, proto.encode_messages(items))

    def check_idle(self) -> None:
        if self.sessions or self.pool.busy():
            self.idle_since = time.monotonic()
        elif self.idle_timeout is not None and time.monotonic() - self.idle_since >= self.idle_timeout:
            logger.info("no client for %g s (--idle-timeout); stopping", self.idle_timeout)
            self.stopping = True

    def check_parent(self) -> None:
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            logger.info("parent process %d is gone; stopping", self.parent_pid)
            self.stopping = True
            self.orphaned = True

    def close(self) -> None:
        self.pool.stop()
        front = getattr(self, "front", None)
        if front is not None:
            front.close()
        if self.guard is not None:
            self.guard.stop()
        self.context.term()
        if self.private_dir is not None:
            shutil.rmtree(self.private_dir, ignore_errors=True)
        if self.orphaned and self.direct is not None:
            # The executor that embedded us died without cleaning up (SIGTERM, SIGKILL): its private
            # folder, which holds our sockets, is ours to remove.
            folder = os.path.dirname(self.direct)
            if os.path.basename(folder).startswith("zmqexecutor-"):
                shutil.rmtree(folder, ignore_errors=True)
        logger.info("zmqexecutor worker stopped")


class _GiveUp(Exception):
    pass


@contextlib.contextmanager
def _signals_to(handler: Any) -> Iterator[int]:
    """SIGINT and SIGTERM call ``handler`` and make the yielded descriptor readable (to wake a poll)."""
    signal_r, signal_w = os.pipe()
    os.set_blocking(signal_w, False)
    old_wakeup = signal.set_wakeup_fd(signal_w)
    old_handlers = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield signal_r
    finally:
        signal.set_wakeup_fd(old_wakeup)
        for sig, old in old_handlers.items():
            signal.signal(sig, old)
        os.close(signal_r)
        os.close(signal_w)


def _batches(items: list[Item]) -> list[list[Item]]:
    """``items`` in messages of at most REPLY_BATCH replies and REPLY_BATCH_BYTES beyond the first."""
    batches: list[list[Item]] = []
    size = 0
    for item in items:
        item_size = _size(item)
        if not batches or len(batches[-1]) >= REPLY_BATCH or size + item_size > REPLY_BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(item)
        size += item_size
    return batches


def _size(item: Item) -> int:
    return sum(map(len, item.frames))
