"""The worker's routing between its clients and its task processes: sessions, the queue of tasks
waiting for a process, and the replies going back, one message per client per loop turn.

Runs in the supervisor's loop thread.

The supervisor (``_supervisor``) owns the lifecycle around it: sockets, signals, draining, exiting.
Nothing here unpickles; frames are passed on as they came.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import time
from typing import Any, Callable, Optional, Union

from .._wire import _protocol as proto
from .._wire._batching import batches, frames_size
from .._wire._errors import MessageTooLargeError
from .._wire._protocol import Item, Kind
from ._front import BoundFront, DialFront
from ._keep import KeptBuffers
from ._relay import Queued, Relay
from ._sessions import Sessions
from ._taskpool import MAX_STARTUP_FAILURES, TaskProcess, TaskProcessPool

logger = logging.getLogger("zmqexecutor.worker")

# What a task process answers a task with. MISSING: it could not map a buffer kept here (let go since
# the task was queued): its client sends the task again, whole.
_REPLIES = frozenset({Kind.RESULT, Kind.EXCEPTION, Kind.INIT_FAILED, Kind.MISSING})

# A client hears PACE again once the measured duration of a task moved by more than this fraction:
# smaller keeps its sending closer to the truth, larger adds the item to fewer replies.
PACE_CHANGE = 0.2


class GiveUp(Exception):
    """Raised when the worker cannot go on (it cannot bind; its task processes keep dying at start)."""


class Router:
    """Routes tasks from clients to task processes and replies back; knows each client's session."""

    def __init__(self, pool: TaskProcessPool, relay: Relay, *, host: str, worker_info: dict[str, Any],
                 status: Callable[[], dict[str, Any]], on_drain: Callable[[], None],
                 kept: Optional[KeptBuffers] = None) -> None:
        self.pool = pool
        self.relay = relay  # which process runs what (_relay); direct: the client hands tasks out itself
        self.kept = KeptBuffers() if kept is None else kept  # buffers clients asked to keep (_keep)
        self.host = host
        self.worker_info = worker_info  # what WELCOME tells: slots, instance, host, max_message_size
        self.status = status
        self.on_drain = on_drain
        self.front: Optional[Union[BoundFront, DialFront]] = None
        self.sessions = Sessions()
        self.queue: collections.deque[Queued] = collections.deque()
        self.outbox: dict[bytes, list[Item]] = {}
        self.draining = False  # then tasks go back (RETURNED), and new sessions hear DRAINING
        self.drain_told_at: Optional[float] = None  # when every client was told DRAINING
        self.tally = {"done": 0, "failed": 0, "crashed": 0, "cancelled": 0}
        self.bytes_received = 0  # from clients, every frame of every message
        self.bytes_sent = 0

    def receive_from_clients(self) -> None:
        assert self.front is not None
        for client, frames in self.front.messages():
            self.bytes_received += frames_size(frames)
            try:
                self.handle_client_message(client, frames)
            except proto.ProtocolError as exc:
                logger.warning("dropped a malformed message from client %r: %s", client, exc,
                               extra={"client": client.decode(errors="replace")})

    def handle_client_message(self, client: bytes, frames: list[Any]) -> None:
        proto.expect_frames(frames, 1)
        header = proto.decode_header(frames[0], any_version=True)
        if header.kind == Kind.HELLO:
            self.greet(client, header, frames)
            return
        if header.kind in (Kind.STATUS, Kind.DRAIN):
            if header.kind == Kind.DRAIN:
                self.on_drain()
            self.send(client, proto.encode_status_reply(self.status()))
            return
        if header.version != proto.PROTOCOL_VERSION:
            raise proto.ProtocolError(f"protocol version {header.version}, expected {proto.PROTOCOL_VERSION}")
        if header.kind not in (Kind.TASK, Kind.NEEDY_TASK, Kind.BATCH, Kind.PING, Kind.TERMINATE, Kind.CANCEL,
                               Kind.BYE):
            raise proto.ProtocolError(f"unexpected {header.kind.name} from a client")
        tasks = proto.split(header, frames)
        session = self.sessions.get(client)
        if session is None:
            if header.kind != Kind.BYE:
                reason = "this worker has no session for the client (it restarted, or the session expired)"
                self.send(client, proto.encode_rejected(tasks[0].ident, reason))
            return
        session.last_seen = time.monotonic()
        if header.kind in (Kind.TASK, Kind.NEEDY_TASK, Kind.BATCH):
            for task in tasks:
                if task.kind not in (Kind.TASK, Kind.NEEDY_TASK) or not task.frames:
                    raise proto.ProtocolError(f"a {task.kind.name} without a call among the tasks")
            refused = self.relay.refuses_tasks()
            if refused is not None:
                dropped = proto.encode_reason(refused)
                for task in tasks:
                    self.reply(client, Item(Kind.DROPPED, task.ident, dropped))
                return
            if self.draining:  # sent before the client heard DRAINING: elsewhere
                for task in tasks:
                    self.reply(client, Item(Kind.RETURNED, task.ident, []))
                return
            for task in tasks:
                self.take_task(client, task)
        elif header.kind == Kind.PING:
            self.send(client, proto.encode_bare(Kind.PONG))
        elif header.kind == Kind.TERMINATE:
            self.terminate_tasks_of(client, header.ident)
        elif header.kind == Kind.CANCEL:
            self.cancel_task(client, header.ident, proto.decode_cancel(frames[1:]))
        else:
            self.forget_session(client, "said goodbye")

    def take_task(self, client: bytes, task: Item) -> None:
        needs, call = proto.decode_needs(task.frames) if task.kind == Kind.NEEDY_TASK else (None, task.frames)
        if needs is not None:
            never = self.relay.never_meets(needs)
            if never is not None:  # its client counts what we offer, so only a confused one sends this
                self.reply(client, Item(Kind.DROPPED, task.ident, proto.encode_reason(never)))
                return
        resolved = self.kept.resolve(client, call)
        if resolved is None:  # it named a buffer let go since: the client sends it again
            self.reply(client, Item(Kind.MISSING, task.ident, []))
        else:
            self.queue.append(Queued(client, task.ident, resolved, needs))

    def greet(self, client: bytes, header: proto.Header, frames: list[Any]) -> None:
        welcome, info, init_blob = proto.answer_hello(header, frames, dict(
            self.worker_info, pid=os.getpid()))
        # A client shakes hands again only after giving up on its tasks here: drop the old session.
        self.forget_session(client, "started a new session" if info is not None else "was refused")
        if info is not None:
            self.sessions.open(client, init_blob, info)
            logger.info("client %s connected (host %s, pid %s)", client.decode(errors="replace"),
                        info.get("host"), info.get("pid"), extra={"client": client.decode(errors="replace")})
        else:
            logger.warning("refused client %r: %s", client, proto.decode_json(welcome[1]).get("reason"),
                           extra={"client": client.decode(errors="replace")})
        self.send(client, welcome)
        if info is not None and self.draining:
            self.send(client, proto.encode_bare(Kind.DRAINING))

    def forget_session(self, client: bytes, why: str) -> None:
        if not self.sessions.close(client):
            return
        kept = collections.deque(item for item in self.queue if item.client != client)
        dropped = len(self.queue) - len(kept)
        self.queue = kept
        self.outbox.pop(client, None)
        self.kept.forget(client)
        logger.info("client %s %s; dropped its session and %d queued task(s)",
                    client.decode(errors="replace"), why, dropped, extra={"client": client.decode(errors="replace")})
        # Nobody waits for what its running tasks return anymore: stop them, freeing their slots.
        self.stop_running_tasks_of(client, signal.SIGTERM, "because its client's session ended")
        self.relay.forget_client(client)

    def expire_sessions(self) -> None:
        for session in self.sessions.expired(time.monotonic()):
            self.forget_session(session.client, f"was silent for {session.expiry:g} s")

    def terminate_tasks_of(self, client: bytes, signum: int) -> None:
        reason = proto.encode_reason("the task was dropped before it started: its client stopped the workers")
        for item in self.queue:
            if item.client == client:
                self.reply(client, Item(Kind.DROPPED, item.task_id, reason))
        self.queue = collections.deque(item for item in self.queue if item.client != client)
        self.stop_running_tasks_of(client, signal.SIGKILL if signum == signal.SIGKILL else signal.SIGTERM,
                                   "at its client's request")

    def stop_running_tasks_of(self, client: bytes, sig: signal.Signals, why: str) -> None:
        for proc in self.pool.procs():
            if self.relay.runs_for(proc, client):
                self.pool.stop_for_client(proc, sig, f"with {sig.name} {why}")

    def cancel_task(self, client: bytes, ident: int, seq: Optional[int]) -> None:
        """Stop one task: relayed, ``ident`` is the client's task id; direct, the process's pid and
        ``seq`` which of the tasks the client sent it (then nothing is queued here)."""
        for item in self.queue:
            if item.client == client and item.task_id == ident:
                self.queue.remove(item)
                self.reply(client, Item(Kind.DROPPED, ident, proto.encode_reason("the task was cancelled")))
                return
        proc = self.relay.running_task(self.pool.procs(), client, ident, seq)
        if proc is not None and not proc.signalled:
            self.pool.stop_for_client(proc, signal.SIGKILL, "with SIGKILL: its client cancelled the task it runs")
            self.tally["cancelled"] += 1

    def send(self, client: bytes, frames: list[Any]) -> None:
        assert self.front is not None
        self.bytes_sent += frames_size(frames)
        self.front.send(client, frames)

    def reply(self, client: bytes, item: Item) -> None:
        self.outbox.setdefault(client, []).append(item)

    def send_replies(self) -> None:
        outbox, self.outbox = self.outbox, {}
        for client, items in outbox.items():
            self.tell_pace(client, items)
            for batch in batches(items, _size):
                self.send(client, proto.encode_messages(batch))

    def tell_pace(self, client: bytes, items: list[Item]) -> None:
        """Add PACE to a client's replies when the relay's measure of a task's duration moved from what
        the client was last told: the client decides how many tasks to send ahead by it."""
        pace = self.relay.service
        session = self.sessions.get(client)
        if pace is None or session is None:
            return
        told = session.told_pace
        if told is None or abs(pace - told) > PACE_CHANGE * told:
            session.told_pace = pace
            items.append(Item(Kind.PACE, round(pace * 1e6), []))

    def receive_from_processes(self, ending: tuple[TaskProcess, ...] = ()) -> None:
        now = time.monotonic()
        for proc, items in self.pool.receive(ending):
            for item in items:
                if item.kind in _REPLIES:
                    self.finish_task(proc, item, now)
                elif item.kind == Kind.OUTPUT:
                    assignment = self.relay.assignment(proc, item.ident)
                    if assignment is not None and self.sessions.get(assignment.client) is not None:
                        self.reply(assignment.client, Item(Kind.OUTPUT, assignment.task_id, item.frames))

    def finish_task(self, proc: TaskProcess, item: Item, now: float) -> None:
        assignment = self.relay.finished(proc, item.ident, now)
        if assignment is None:
            logger.error("task process %s replied for a task it was not given", proc.process.pid)
            return
        if item.kind != Kind.MISSING:
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
            self.relay.close_after_tasks(proc)
        if self.relay.may_retire(proc):
            self.pool.retire(proc)

    def too_large(self, task_id: int, size: int, limit: int) -> Item:
        error = MessageTooLargeError(
            f"the task's result is {size} bytes, more than the client's max_message_size={limit}")
        return Item(Kind.EXCEPTION, task_id, proto.encode_exception(error, host=self.host, pid=os.getpid()))

    def reap_processes(self, sentinels: list[int]) -> None:
        if sentinels:  # first, what they sent just before they ended
            self.receive_from_processes(tuple(self.pool.by_sentinel[fd] for fd in sentinels))
        for fd in sentinels:
            proc, stopped_with_worker = self.pool.reap(fd)
            ended = self.relay.ended(proc, host=self.host, stopped_with_worker=stopped_with_worker)
            for to, item in ended.replies:
                for client in [session.client for session in self.sessions] if to is None else [to]:
                    if self.sessions.get(client) is not None:
                        if item.kind == Kind.CRASHED:
                            self.tally["crashed"] += 1
                            name = client.decode(errors="replace")
                            logger.info("task %d of client %s went with task process %s", item.ident, name,
                                        proc.process.pid, extra={"client": name, "task": item.ident})
                        self.reply(client, item)
            self.queue.extendleft(reversed(ended.unstarted))
            if self.pool.startup_failures >= MAX_STARTUP_FAILURES:
                raise GiveUp(f"{self.pool.startup_failures} task processes in a row died before starting; giving up")

    def dispatch_tasks(self) -> None:
        if self.queue:
            for proc, items in self.relay.hand_out(self.queue, self.sessions, self.pool.procs(), time.monotonic()):
                self.pool.send(proc, proto.encode_messages(items))

    def busy(self) -> int:
        """Task processes running (or holding) a task."""
        return self.relay.busy(self.pool.procs())

    def tell_draining(self) -> None:
        """Take no more tasks, and tell every client so."""
        self.draining = True
        self.drain_told_at = time.monotonic()
        self.tell_all(proto.encode_bare(Kind.DRAINING))

    def clients_caught_up(self) -> bool:
        """Every client has said something since it was told DRAINING (a client answers it at once), so
        every task it sent before has arrived (and gone back): a draining worker may leave now."""
        told = self.drain_told_at
        return told is None or all(session.last_seen > told for session in self.sessions)

    def tell_all(self, frames: list[Any]) -> None:
        for session in self.sessions:
            self.send(session.client, frames)

    def abandon_running(self, why: str) -> None:
        for client, item in self.relay.abandon(why):
            if self.sessions.get(client) is not None:
                self.reply(client, item)

    def give_back_queue(self) -> None:
        """Hand every queued task back to its client (draining): sent elsewhere, no retry counted."""
        for client, task_id, *_ in self.queue:
            self.reply(client, Item(Kind.RETURNED, task_id, []))
        self.queue.clear()


def _size(item: Item) -> int:
    return frames_size(item.frames)
