"""The worker's task processes: start, hand out work with credit, retire, reap, account for crashes.

Runs in the supervisor's loop thread.

Relayed (a worker started by the user), the supervisor hands out every task and knows what each
process holds. Direct (the embedded worker), the processes take tasks from the client itself; the
pool then only starts, reaps and replaces them, and reports each end with the process's counters
(``exits``) so that the client can account for the tasks it sent there.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import signal
import time
from typing import Any, NamedTuple, Optional

from .._wire import _protocol as proto
from .._wire._channel import Listener, Peer
from .._wire._protocol import Item, Kind
from ._sessions import Sessions
from ._taskprocess import (
    COUNTERS,
    DEADLINE,
    DRAINING,
    FINISHED,
    LIMIT_MS,
    RETIRED,
    STARTED,
    TERM_OK,
    UP,
    task_process_main,
)

logger = logging.getLogger("zmqexecutor.worker")

# Task processes that die before they ever report ready point at a broken installation; rather than
# respawn them forever, the supervisor gives up after this many in a row.
MAX_STARTUP_FAILURES = 5

# On shutdown, task processes get this long to exit after SIGTERM before they are killed.
STOP_GRACE = 2.0

# Tasks queued inside a task process beyond the one it runs: enough to keep it busy this long, at most
# MAX_AHEAD. None go ahead while tasks take longer than QUEUE_AHEAD_SECONDS, so a long task never
# holds back one that another process could start now. The count binds only for the tiniest tasks,
# where a process that runs dry sooner costs a wake-up per handful of tasks.
QUEUE_AHEAD_SECONDS = 0.002
MAX_AHEAD = 256

# How fast the estimate of a task's duration follows new samples (an exponential average).
SERVICE_SMOOTHING = 0.1

# A task past its time limit gets SIGTERM, then SIGKILL this much later if its process still lives
# (a task may have installed a handler of its own, or be stuck in code that holds off signals).
TIME_LIMIT_GRACE = 2.0

# While tasks run, the pool looks this often for one that started with a time limit (the task process
# sets it in shared memory; no message says so). A task therefore ends at most this late.
TIME_LIMIT_CHECK = 0.1


class Queued(NamedTuple):
    """A task waiting on the worker for a task process."""

    client: bytes
    task_id: int  # the client's id
    frames: Any


class Assignment(NamedTuple):
    seq: int  # the how-many-th task this process was given, from 0
    client: bytes
    task_id: int  # the client's id; the process knows the task by the supervisor's own id
    frames: Any


class TaskProcess:
    __slots__ = ("process", "ident", "ready", "counters", "assigned", "given", "initialized", "counts",
                 "closing", "retiring", "last_event", "signalled", "peer", "timed_out", "kill_at")

    def __init__(self, process: Any, counters: Any) -> None:
        self.process = process
        self.ident = str(process.pid).encode()
        self.ready = False
        self.counters = counters  # [started, finished], written by the process
        self.assigned: collections.OrderedDict[int, Assignment] = collections.OrderedDict()
        self.given = 0
        self.initialized: set[bytes] = set()
        self.counts: dict[bytes, int] = {}
        self.closing = False  # reached a client's max_tasks_per_child: retire once its tasks are done
        self.retiring = False
        self.last_event = 0.0
        self.signalled = False  # stopped by the supervisor, for its client
        self.peer: Optional[Peer] = None  # its connection, once it said READY
        self.timed_out: Optional[float] = None  # the limit (s) its running task overran: it is being ended
        self.kill_at = 0.0

    def running(self) -> Optional[Assignment]:
        started, finished = self.counters[STARTED], self.counters[FINISHED]
        if started > finished:
            for assignment in self.assigned.values():
                if assignment.seq == finished:
                    return assignment
        return None

    def enforce_time_limit(self, now: float) -> Optional[float]:
        """SIGTERM the process if its task ran past its time limit, SIGKILL it if that did not end it;
        returns when to look again, or None while it runs no task."""
        counters = self.counters
        if self.timed_out is not None:
            if now >= self.kill_at:
                _signal(self, signal.SIGKILL)
                self.kill_at = now + TIME_LIMIT_GRACE
            return self.kill_at
        started = counters[STARTED]
        if started == counters[FINISHED]:
            return None
        deadline = counters[DEADLINE]
        # Read after the counters, and again below: a deadline seen is that of the task running.
        if deadline and int(now * 1e9) >= deadline and counters[STARTED] == started > counters[FINISHED]:
            self.timed_out = counters[LIMIT_MS] / 1000
            self.kill_at = now + TIME_LIMIT_GRACE
            logger.warning("task process %s ran a task past its time limit of %g s; stopping it",
                           self.process.pid, self.timed_out)
            _signal(self, signal.SIGTERM)
            return self.kill_at
        return deadline / 1e9 if deadline else now + TIME_LIMIT_CHECK


class TaskProcessPool:
    def __init__(self, address: str, mp: Any, *, direct: bool = False, spin: bool = False) -> None:
        """``spin``: the processes look for their next task awake a moment after each reply (when
        each has a CPU of its own)."""
        self.address = address
        self.spin = spin
        self.mp = mp
        self.direct = direct
        self.exits: list[dict[str, Any]] = []  # direct: processes that ended, for the client
        self.by_ident: dict[bytes, TaskProcess] = {}
        self.by_sentinel: dict[int, TaskProcess] = {}
        self.service: Optional[float] = None
        self.startup_failures = 0
        self.ids = 0  # the supervisor's own task ids, unique across clients
        self.timed_out = 0  # tasks ended for running past their time limit
        self.draining = False  # the worker is going away: what dies now is not replaced
        self.listener: Optional[Listener] = None

    def open(self) -> None:
        """The socket the processes connect to when relayed (in direct mode they connect to the client)."""
        if not self.direct:
            self.listener = Listener(self.address, reuse_buffers=True)

    def receive(self, ending: tuple[TaskProcess, ...] = ()) -> list[tuple[TaskProcess, list[Item]]]:
        """What the processes sent, READY taken in, and all that the ``ending`` ones sent before they
        ended; a message from a process already reaped is dropped."""
        if self.listener is None:
            return []
        messages = self.listener.receive()
        for ended in ending:
            if ended.peer is not None:
                messages += [(ended.peer, frames) for frames in self.listener.read_to_end(ended.peer)]
        received = []
        for peer, frames in messages:
            try:
                proto.expect_frames(frames, 1)
                header = proto.decode_header(frames[0])
                items = proto.split(header, frames)
            except proto.ProtocolError as exc:
                logger.error("dropped a malformed message from a task process: %s", exc)
                continue
            proc: Optional[TaskProcess] = peer.owner
            if proc is None and header.kind == Kind.READY:
                proc = peer.owner = self.by_ident.get(str(header.ident).encode())
                if proc is None:
                    peer.close()
                    continue
                proc.peer = peer
                proc.ready = True
                self.startup_failures = 0
            if proc is None or self.by_ident.get(proc.ident) is not proc:
                continue
            received.append((proc, items))
        return received

    def send(self, proc: TaskProcess, frames: list[Any]) -> bool:
        if proc.peer is None or not proc.peer.send(frames):
            # The process died before its sentinel was seen: the reaper accounts for its tasks.
            logger.debug("task process %s unreachable", proc.process.pid)
            return False
        return True

    def start(self, count: int, mp: Any = None) -> None:
        for _ in range(count):
            context = mp or self.mp
            counters = context.RawArray("Q", COUNTERS)
            # The embedded worker's processes print into the user's terminal through the client only.
            counters[DRAINING] = self.draining
            process = context.Process(target=task_process_main,
                                      args=(self.address, os.getpid(), counters, not self.direct, self.spin,
                                            not self.direct),
                                      name="zmqexecutor-task", daemon=True)
            process.start()
            proc = TaskProcess(process, counters)
            self.by_ident[proc.ident] = proc
            self.by_sentinel[process.sentinel] = proc

    def mark_draining(self) -> None:
        """From now on a SIGTERM that reaches the processes from outside leaves their tasks running."""
        self.draining = True
        for proc in self.by_ident.values():
            proc.counters[DRAINING] = 1

    def idle(self) -> bool:
        """Nothing is running or waiting in any process."""
        if self.direct:
            return self.busy() == 0
        return not any(proc.assigned for proc in self.by_ident.values())

    def busy(self) -> int:
        if self.direct:
            return sum(proc.counters[STARTED] > proc.counters[FINISHED] for proc in self.by_ident.values())
        return sum(bool(proc.assigned) for proc in self.by_ident.values())

    def credit(self, proc: TaskProcess) -> int:
        if not proc.ready or proc.closing or proc.retiring:
            return 0
        ahead = 0 if self.service is None else min(MAX_AHEAD, int(QUEUE_AHEAD_SECONDS / max(self.service, 1e-9)))
        return 1 + ahead - len(proc.assigned)

    def with_credit(self) -> list[TaskProcess]:
        """Processes that may take tasks now, the most recently active first (its code is warm)."""
        procs = [proc for proc in self.by_ident.values() if self.credit(proc) > 0]
        procs.sort(key=lambda proc: proc.last_event, reverse=True)
        return procs

    def assign(self, proc: TaskProcess, client: bytes, task_id: int, frames: Any, now: float,
               limit: Optional[int]) -> tuple[int, bool]:
        """Record a task given to ``proc``: the id the process knows it by, and whether the
        process needs the client's initializer first."""
        self.ids += 1
        if not proc.assigned:
            proc.last_event = now
        proc.assigned[self.ids] = Assignment(proc.given, client, task_id, frames)
        proc.given += 1
        first = client not in proc.initialized
        proc.initialized.add(client)
        count = proc.counts[client] = proc.counts.get(client, 0) + 1
        if limit is not None and count >= limit:
            proc.closing = True
        return self.ids, first

    def finished(self, proc: TaskProcess, ident: int, now: float) -> Optional[Assignment]:
        assignment = proc.assigned.pop(ident, None)
        if assignment is not None:
            sample = now - proc.last_event
            self.service = sample if self.service is None else self.service + SERVICE_SMOOTHING * (sample - self.service)
            proc.last_event = now
        return assignment

    def forget_client(self, client: bytes) -> None:
        for proc in self.by_ident.values():
            proc.initialized.discard(client)
            proc.counts.pop(client, None)

    def retire(self, proc: TaskProcess) -> None:
        """Stop ``proc`` once the tasks it has are done; a replacement starts now."""
        if not self.send(proc, [proto.encode_header(Kind.STOP)]):
            _signal(proc, signal.SIGTERM)
        proc.retiring = True
        if not self.draining:
            self.start(1)

    def kill_running(self, client: bytes, ident: int, seq: Optional[int]) -> bool:
        """Kill the process running the client's task ``ident`` (direct: process ``ident`` if the task
        it runs is the ``seq``-th it was sent); False if no process runs that task now."""
        if seq is None:
            target = next((proc for proc in self.by_ident.values() if (running := proc.running()) is not None
                           and running.client == client and running.task_id == ident), None)
        else:
            target = self.by_ident.get(str(ident).encode())
            if target is not None and not target.counters[STARTED] - 1 == seq >= target.counters[FINISHED]:
                target = None
        if target is None or target.signalled:
            return False
        logger.info("killing task process %s: its client cancelled the task it runs", target.process.pid)
        target.signalled = True
        _signal(target, signal.SIGKILL)
        return True

    def signal_running(self, client: bytes, sig: signal.Signals, why: str) -> None:
        for proc in list(self.by_ident.values()):
            if self.direct:  # one client: every running task is its
                ours = proc.counters[STARTED] > proc.counters[FINISHED]
            else:
                running = proc.running()
                ours = running is not None and running.client == client
            if ours and proc.process.pid is not None:
                logger.info("stopping task process %d with %s %s", proc.process.pid, sig.name, why)
                proc.signalled = True
                _signal(proc, sig)

    def enforce_time_limits(self, now: float) -> Optional[float]:
        """End the processes whose task ran past its time limit (SIGTERM, later SIGKILL); returns when
        to look again (a monotonic time), or None while no task runs."""
        dues = [due for proc in self.by_ident.values() if (due := proc.enforce_time_limit(now)) is not None]
        return min(dues, default=None)

    def hand_out(self, queue: "collections.deque[Queued]", sessions: Sessions
                 ) -> list[tuple[TaskProcess, list[Item]]]:
        """Take queued tasks for the processes with credit, the most recently active first, each a fair
        share of what waits; a task of a session that is gone is dropped."""
        now = time.monotonic()
        procs = self.with_credit()
        handed = []
        for index, proc in enumerate(procs):
            share = math.ceil(len(queue) / (len(procs) - index))
            items = []
            for _ in range(min(self.credit(proc), share)):
                if not queue:
                    break
                client, task_id, frames = queue.popleft()
                session = sessions.get(client)
                if session is None:
                    continue
                ident, first = self.assign(proc, client, task_id, frames, now, session.max_tasks_per_child)
                items.append(proto.process_task(ident, client, session.init_blob if first else b"", frames))
                if proc.closing:
                    break
            if items:
                handed.append((proc, items))
        return handed

    def reap(self, fd: int, host: str) -> tuple[list[tuple[bytes, Item]], list[Queued]]:
        """A task process ended: the replies its clients get (CRASHED for the task it was running, LOST
        for finished ones whose replies died with it) and the tasks it never started. A replacement
        starts unless it ended on purpose."""
        proc = self.by_sentinel.pop(fd)
        del self.by_ident[proc.ident]
        proc.process.join()
        if proc.retiring:
            return [], []
        if proc.ready or proc.counters[UP]:
            self.startup_failures = 0
        else:
            self.startup_failures += 1
        started, finished = proc.counters[STARTED], proc.counters[FINISHED]
        pid, code = proc.process.pid, proc.process.exitcode
        retired = bool(proc.counters[RETIRED])
        signal_name, how = proto.describe_exit(code)
        if self.direct:
            self.exits.append(dict(pid=pid, started=started, finished=finished, exitcode=code, retired=retired,
                                   timed_out=proc.timed_out))
        self.timed_out += proc.timed_out is not None
        # Killed from outside while the worker is being stopped (SIGKILL after Slurm's KillWait, say): the
        # task went with its worker, which is no fault of the task's.
        stopped_with_worker = (self.draining and signal_name in ("SIGKILL", "SIGTERM") and not proc.signalled
                               and proc.timed_out is None)
        replies = []
        for a in proc.assigned.values():
            if a.seq < finished:  # it ran; its reply died with the process: the client retries it
                reason = proto.encode_reason(f"its reply was lost when task process {pid} {how} in a later task")
                replies.append((a.client, Item(Kind.LOST, a.task_id, reason)))
            elif a.seq < started and stopped_with_worker:
                reason = proto.encode_reason(f"task process {pid} {how} while its worker was stopping")
                replies.append((a.client, Item(Kind.LOST, a.task_id, reason)))
            elif a.seq < started:
                crash = proto.encode_crash(exitcode=code, signal_name=signal_name, host=host, pid=pid,
                                           timed_out=proc.timed_out)
                replies.append((a.client, Item(Kind.CRASHED, a.task_id, crash)))
        replacing = "; not replaced: the worker is stopping" if self.draining else "; replacing it"
        if started > finished:
            # Expected when we stopped it for its client, or with its worker; news otherwise.
            expected = proc.signalled or proc.timed_out is not None or stopped_with_worker
            logger.log(logging.INFO if expected else logging.WARNING,
                       "task process %d %s while running a task%s", pid, how, replacing)
        elif not retired:
            logger.warning("idle task process %d %s%s", pid, how, replacing)
        if not self.draining:
            self.start(1)
        return replies, [Queued(a.client, a.task_id, a.frames) for a in proc.assigned.values() if a.seq >= started]

    def abandon(self, why: str) -> list[tuple[bytes, Item]]:
        """The worker stops before its processes are done: each task they were given is lost with it (the
        client sends it elsewhere), said here since no reply will come."""
        replies = []
        for proc in self.by_ident.values():
            for a in proc.assigned.values():
                replies.append((a.client, Item(Kind.LOST, a.task_id, proto.encode_reason(why))))
            proc.assigned.clear()
        return replies

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
        for proc in self.by_ident.values():
            if proc.process.is_alive():
                _signal(proc, signal.SIGTERM)
        procs = [proc.process for proc in self.by_ident.values()]
        deadline = time.monotonic() + STOP_GRACE
        for process in procs:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(1.0)


def _signal(proc: TaskProcess, sig: signal.Signals) -> None:
    if sig == signal.SIGTERM:
        proc.counters[TERM_OK] = 1  # it is ours: the process dies of it at once, draining or not
    if proc.process.pid is not None:
        try:
            os.kill(proc.process.pid, sig)
        except ProcessLookupError:
            pass
