"""A worker as the client sees it (handshake state, load, heartbeats), and one bound worker endpoint's
connection (its socket and monitor). Workers that dial in are in ``_dialin``.

Runs in the client's I/O thread.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, NamedTuple, Optional, Protocol

import zmq

from .._wire import _protocol as proto
from .._wire import _sockets
from .._wire._endpoints import probe
from .._wire._errors import SecurityError, VersionMismatchError
from .._wire._protocol import Kind
from .._wire._sockets import DRAIN_LIMIT, drain
from .._wire._curve import (
    HANDSHAKE_FAILURE_EVENTS,
    HANDSHAKE_FAILURES,
    ClientKeys,
    secure_client_socket,
)
from ._direct import DirectLanes
from ._scheduler import Load, Scheduler, Task

logger = logging.getLogger("zmqexecutor")

# Reconnection attempts to a worker that is down start this often and back off up to the maximum.
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 1000
# The local worker binds a moment after we connect: retry often, without backing off, so the first
# task does not wait out a long back-off interval.
LOCAL_RECONNECT_IVL_MS = 10

# How long closing sockets may spend flushing the final BYE.
CLOSE_LINGER_MS = 200

# A worker still not connected after this long gets a warning with the reason a plain connection
# attempt gives (refused, no such host, ...). Sooner would warn about workers that are just starting.
UNREACHABLE_WARNING_SECONDS = 3.0
PROBE_TIMEOUT = 2.0

# A worker with nothing of ours in flight gets this many heartbeats per worker_timeout, not one every
# beat (four per timeout): losing it late costs no task, libzmq's own heartbeats still close a dead
# connection at once, and the worker's session outlives three timeouts of silence. An idle fleet of a
# thousand cost the client 4-6 % of a core at four per timeout. More notices a hung idle worker sooner.
IDLE_BEATS_PER_TIMEOUT = 1

# libzmq's own heartbeats on a bound worker's connection, per worker_timeout: they close a connection
# whose peer went silent, however idle, so that it reconnects once the peer is back. Ours detect a lost
# busy worker sooner anyway; each of theirs costs libzmq's I/O thread, which for a thousand workers at
# four per timeout was 2.7 % of a core of an idle client's 3.3 %.
ZMTP_BEATS_PER_TIMEOUT = 2

_MONITORED_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILURE_EVENTS


class Inbox(Protocol):
    """Where every source of input (_fleet.Source) hands its messages: the engine."""

    def handle_message(self, conn: "Connection", frames: list[Any]) -> None: ...

    def handle_dialled(self, port: Any, frames: list[Any]) -> None: ...


class WorkerInfo(NamedTuple):
    """A snapshot of one worker endpoint as this executor sees it (``ZMQExecutor.workers()``)."""

    endpoint: str
    state: str  # "connecting", "ready", "draining" or "incompatible"
    slots: int
    in_flight: int
    completed: int
    lost: int
    host: Optional[str]
    pid: Optional[int]
    instance: Optional[str]
    error: Optional[str]
    resources: dict[str, float] = {}  # what it offers (``--resources``)
    resources_in_use: dict[str, float] = {}  # what this executor's tasks there hold of them
    # Seconds a task takes there, per slot: as the worker measures it, else from the gaps between its
    # replies; None until known. How many tasks go to it ahead of its slots follows from this.
    task_seconds: Optional[float] = None


def connecting(address: str) -> WorkerInfo:
    """A worker endpoint not connected yet, as ``workers()`` shows it."""
    return WorkerInfo(address, "connecting", 0, 0, 0, 0, None, None, None, None, {}, {})


class Connection:
    """A worker as the client sees it, however it is reached: handshake state, load and heartbeats."""

    CONNECTING = "connecting"
    READY = "ready"
    INCOMPATIBLE = "incompatible"
    lanes: Optional[DirectLanes] = None  # the embedded worker's task processes, reached directly
    gone = False  # a dialled-in worker whose connection closed

    def __init__(self, address: str, *, hello: list[bytes], heartbeat: float, local: bool,
                 sent_to: set[Any]) -> None:
        self.address = address
        # Every connection that sent joins this set, so the engine checks it for input it took in silently.
        self.sent_to = sent_to
        self.hello = hello
        self.heartbeat = heartbeat
        self.hello_at = float("-inf")  # when HELLO last went out
        self.state = self.CONNECTING
        self.load = Load(address, owner=self)
        self.local = local
        self.connecting_since = time.monotonic()
        self.instance: Optional[str] = None
        self.info: dict[str, Any] = {}
        self.error: Optional[BaseException] = None
        self.pinged_at = float("-inf")  # when the last heartbeat went out
        # When the oldest unanswered heartbeat was sent; None while the worker has answered since.
        self.awaiting_since: Optional[float] = None
        # Digests of the buffers this session asked the worker to keep (KEEP): later tasks name them
        # (HELD) instead of sending them again. Emptied with each new session and on MISSING.
        self.held: set[bytes] = set()

    def send(self, frames: list[Any]) -> bool:
        raise NotImplementedError

    def heard_from(self) -> None:
        """The worker sent something: it is alive, whatever heartbeat it still owes."""
        self.awaiting_since = None

    def cancel(self, task: Task, position: int) -> None:
        """Have the worker stop ``task`` (dropped if queued there, its process killed if it runs)."""
        self.send(proto.encode_cancel(task.ident))

    def idle(self) -> bool:
        """Whether no task of ours is in flight there (its task processes' included)."""
        return not self.load.inflight and (self.lanes is None or not self.lanes.in_flight())

    def may_hold_tasks(self) -> bool:
        """Whether tasks may be in flight here (to settle when it is lost)."""
        return True

    def forget_if_gone(self) -> bool:
        """Whether the connection is gone for good (then it is forgotten by whoever reached it)."""
        return False

    def look_into_silence(self, now: float) -> None:
        pass

    @property
    def ready(self) -> bool:
        return self.state == self.READY

    def snapshot(self) -> WorkerInfo:
        host, pid = self.info.get("host"), self.info.get("pid")
        in_flight, completed = len(self.load.inflight), self.load.completed
        if self.lanes is not None:
            in_flight += self.lanes.in_flight()
            completed += self.lanes.completed_total()
        state = "draining" if self.state == self.READY and self.load.draining else self.state
        return WorkerInfo(self.address, state, self.load.slots, in_flight, completed, self.load.lost,
                          host if isinstance(host, str) else None, pid if isinstance(pid, int) else None,
                          self.instance, None if self.error is None else str(self.error),
                          dict(self.load.resources), dict(self.load.in_use),
                          self.load.service if self.load.measured is None else self.load.measured)

    def send_tasks(self, batch: list[Task]) -> bool:
        keep = self.info.get("keep_bytes") or 0
        if not keep or not any(task.keepable for task in batch):
            return self.send(proto.encode_messages([_item(task, task.frames) for task in batch]))
        items, kept = [], set(self.held)
        for task in batch:
            items.append(_item(task, _marked(task, kept, keep)))
        if not self.send(proto.encode_messages(items)):
            return False
        self.held = kept
        return True

    def forget_held(self) -> None:
        """The worker let go of a buffer it kept for us (MISSING): send each again, once."""
        self.held.clear()

    def take_tasks_from(self, scheduler: Scheduler, *, draining: bool) -> None:
        """The worker is ready (first, or again after a restart): the scheduler may give it tasks."""
        limit = self.info.get("max_message_size")
        if self.lanes is None:
            scheduler.attach(self.load, self.info["slots"], limit if isinstance(limit, int) else None,
                             self.info.get("resources"))
            self.load.draining = draining
        else:  # the embedded worker: its task processes take them, a lane each
            self.load.slots = self.info["slots"]
            self.lanes.attach_all(scheduler)

    def draining(self) -> None:
        """The worker said DRAINING: it takes no more tasks; those in flight there finish. Answered
        at once (a PING): the worker waits for a word sent after DRAINING, which comes after every
        task sent before it, so that none is still on its way when the worker leaves."""
        if not self.load.draining:
            logger.info("worker %s is draining: no more tasks go there; %d in flight finish there",
                        self.address, len(self.load.inflight))
        self.load.draining = True
        self.send(proto.encode_bare(Kind.PING))

    def welcome(self, header: proto.Header, frames: list[Any]) -> Optional[str]:
        """Take a WELCOME. Returns why the tasks in flight here are lost (the worker restarted or
        became incompatible), or None."""
        info, problem = proto.read_welcome(header, frames, them=f"worker {self.address}")
        lost = None
        if problem is not None:
            logger.error("cannot use worker %s: %s", self.address, problem)
            if self.ready:
                lost = "it was replaced by an incompatible worker"
            self.state = self.INCOMPATIBLE
            self.error = VersionMismatchError(f"cannot use worker {self.address}: {problem}")
            return lost
        if self.ready:
            if info["instance"] == self.instance:
                return None  # the answer to a HELLO repeated while we waited
            lost = "it restarted"
        if self.instance is not None and self.instance != info["instance"]:
            logger.warning("worker %s restarted (instance %s -> %s)", self.address, self.instance, info["instance"])
        self.info = info
        self.instance = info["instance"]
        self.state = self.READY
        self.held.clear()  # a new session keeps nothing yet
        self.error = None
        self.forget_probe()
        self.awaiting_since = None
        logger.debug("worker %s ready with %d slots", self.address, info["slots"])
        return lost

    def lost(self) -> None:
        """Forget the session; shake hands again at once (the handshake also repeats every beat)."""
        self.state = self.CONNECTING
        self.held.clear()
        self.connecting_since = time.monotonic()
        self.forget_probe()
        if isinstance(self.error, ConnectionError):
            self.error = None
        self.awaiting_since = None
        self.say_hello()

    def say_hello(self) -> None:
        if self.send(self.hello):
            self.hello_at = time.monotonic()

    # Liveness -----------------------------------------------------------------------------------------

    def beat(self, now: float, worker_timeout: float) -> Optional[str]:
        """One heartbeat: PING a ready worker, repeat HELLO to one we wait for. Returns why the
        worker counts as lost (silent for ``worker_timeout``), or None."""
        if self.state == self.READY:
            if self.awaiting_since is not None and now - self.awaiting_since > worker_timeout:
                return f"no answer for {worker_timeout:g} s"
            if self.awaiting_since is None and self.idle() and now - self.pinged_at < worker_timeout / IDLE_BEATS_PER_TIMEOUT:
                return None
            if self.send(_PING):
                self.pinged_at = now
                if self.awaiting_since is None:
                    self.awaiting_since = now
        else:
            self.say_hello_again()
            self.look_into_silence(now)
        return None

    @property
    def definitely_unusable(self) -> bool:
        """Refused for a reason that retrying will not change: versions or keys."""
        return self.state == self.INCOMPATIBLE or isinstance(self.error, SecurityError)

    def say_hello_again(self) -> None:
        # Unless one just went out on this connection: its answer may still be on its way.
        if self.state == self.CONNECTING and time.monotonic() - self.hello_at >= self.heartbeat:
            self.say_hello()

    def forget_probe(self) -> None:
        pass

    def close(self) -> None:
        if self.ready:
            self.send(proto.encode_bare(Kind.BYE))


_PING = proto.encode_bare(Kind.PING)


def _item(task: Task, frames: list[Any]) -> proto.Item:
    if task.needs is None:
        return proto.Item(Kind.TASK, task.ident, frames)
    return proto.needy_task(task.ident, task.needs, frames)


def _marked(task: Task, held: set[bytes], budget: int) -> list[Any]:
    """``task``'s frames with each keepable buffer the worker holds named (HELD), and each it does
    not sent with a KEEP marker (added to ``held``); buffers over the worker's budget go as they are."""
    frames = list(task.frames)
    marks: list[tuple[int, bytes]] = []
    for index, digest in task.keepable:  # in order: a KEEP comes before any HELD of the same buffer
        if digest in held:
            marks.append((index, proto.held_marker(digest)))
        elif memoryview(frames[index]).nbytes <= budget:
            held.add(digest)
            marks.append((index, proto.keep_marker(digest)))
    for index, mark in reversed(marks):  # from the end, so that the indices before stay right
        if mark.startswith(proto.HELD_MARK):
            frames[index] = mark
        else:
            frames.insert(index, mark)
    return frames


class WorkerConnection(Connection):
    """A worker bound at an endpoint: a DEALER of ours connects to it, and reconnects after a fault."""

    def __init__(self, address: str, context: zmq.Context[Any], *, hello: list[bytes], heartbeat: float,
                 worker_timeout: float, max_message_size: int, keys: Optional[ClientKeys],
                 client_id: bytes, local: bool, sent_to: set[Any], lanes: Optional[DirectLanes] = None) -> None:
        super().__init__(address, hello=hello, heartbeat=heartbeat, local=local, sent_to=sent_to)
        if lanes is not None:  # the embedded worker's supervisor: its task processes take the tasks
            self.lanes = lanes
            lanes.supervisor = self
        self.probe: Optional[list[str]] = None  # filled by a probe thread: why it is unreachable
        self.socket = _sockets.unbounded(context.socket(zmq.DEALER))
        self.socket.setsockopt(zmq.ROUTING_ID, client_id)
        # Queue nothing for a worker we are not connected to: a send then fails at once, and what
        # would have waited in a dead connection's pipe stays in our backlog instead.
        self.socket.setsockopt(zmq.IMMEDIATE, 1)
        # libzmq's own heartbeats close a connection whose peer stopped answering (a cut link, a
        # stopped process), so that it reconnects as soon as the peer is back.
        self.socket.setsockopt(zmq.HEARTBEAT_IVL, max(1, int(worker_timeout / ZMTP_BEATS_PER_TIMEOUT * 1000)))
        self.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, int(worker_timeout * 1000)))
        self.socket.setsockopt(zmq.RECONNECT_IVL, LOCAL_RECONNECT_IVL_MS if local else RECONNECT_IVL_MS)
        self.socket.setsockopt(zmq.RECONNECT_IVL_MAX, 0 if local else RECONNECT_IVL_MAX_MS)
        # A worker (or an impostor) sending a bigger frame is disconnected by libzmq unread.
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_message_size)
        if keys is not None and keys.applies_to(address):
            secure_client_socket(self.socket, keys, address)
        self.monitor = self.socket.get_monitor_socket(_MONITORED_EVENTS)
        self.socket.connect(address)

    def send(self, frames: list[Any]) -> bool:
        self.sent_to.add(self)
        try:
            self.socket.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False  # not connected right now
        return True

    def take_input(self, inbox: "Inbox") -> bool:
        """Hand what the worker sent to ``inbox``; True if more may be left unread."""
        messages = drain(self.socket)
        for frames in messages:
            try:
                inbox.handle_message(self, frames)
            except proto.ProtocolError as exc:
                logger.warning("dropped a malformed message from %s: %s", self.address, exc)
        return len(messages) >= DRAIN_LIMIT

    def departures(self) -> tuple[list[tuple[Connection, str]], bool]:
        """Read the monitor: this connection if its session is lost (and why); never a dial-in's news."""
        why = self.connection_events()
        return ([] if why is None else [(self, why)]), False

    def connection_events(self) -> Optional[str]:
        """Read the monitor; returns why the session is lost when the connection closed, else None."""
        lost = None
        for event in _sockets.monitor_events(self.monitor):
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.say_hello_again()
            elif event in HANDSHAKE_FAILURES:
                problem = HANDSHAKE_FAILURES[event]
                if self.error is None or str(self.error) != problem:
                    logger.error("cannot connect to worker %s: %s", self.address, problem)
                self.error = SecurityError(problem)
            elif event == zmq.EVENT_DISCONNECTED:
                self.hello_at = float("-inf")  # that HELLO went with the connection
                if self.ready:
                    lost = "the connection closed"
        return lost

    def look_into_silence(self, now: float) -> None:
        """Still no handshake after a few seconds: find out why once (in a thread, since DNS may
        block), then warn with the answer."""
        if self.local or self.error is not None or now - self.connecting_since < UNREACHABLE_WARNING_SECONDS:
            return
        if self.probe is None:
            self.probe = []
            answer = self.probe
            threading.Thread(target=lambda: answer.append(probe(self.address, PROBE_TIMEOUT)),
                             name="zmqexecutor-probe", daemon=True).start()
        elif self.probe:
            reason = self.probe[0]
            self.error = ConnectionError(reason)  # reported once per outage: no probe while it is set
            logger.warning("cannot reach worker %s after %.0f s: %s; still trying", self.address,
                           now - self.connecting_since, reason)

    def forget_probe(self) -> None:
        self.probe = None

    def close(self) -> None:
        super().close()
        self.socket.disable_monitor()
        self.monitor.close(linger=0)
        self.socket.close(linger=CLOSE_LINGER_MS)
