"""Which task process runs which task: the relaying of tasks (assign, credit, hand-out) and what a
process's end means for the tasks it had; no sockets, no processes of its own.

Runs in the supervisor's loop thread.

Two kinds, one interface for the router:

* ``Relay`` (a worker started by the user): the supervisor hands out every task, a fair share to each
  process with credit, and knows what each holds; when one ends, the task it ran CRASHED, the ones it
  finished whose replies died with it are LOST, and the ones it never started are queued again.
* ``DirectTasks`` (the embedded worker): the processes take their tasks from the client itself, so the
  supervisor hands out nothing; when one ends, every client hears EXITED with the process's counters,
  from which the client settles the tasks it sent there.
"""

from __future__ import annotations

import collections
import logging
import math
from typing import Any, NamedTuple, Optional, Sequence

from .._wire import _pacing, _resources
from .._wire import _protocol as proto
from .._wire._protocol import Item, Kind
from .._wire._histogram import Histogram
from .._wire._resources import Amounts
from ._sessions import Sessions
from ._taskprocess import FINISHED, RETIRED, STARTED

logger = logging.getLogger("zmqexecutor.worker")


class Queued(NamedTuple):
    """A task waiting on the worker for a task process."""

    client: bytes
    task_id: int  # the client's id
    frames: Any
    needs: Optional[Amounts] = None  # of the worker's resources, while it runs (NEEDY_TASK)


class Assignment(NamedTuple):
    seq: int  # the how-many-th task its process was given, from 0
    client: bytes
    task_id: int  # the client's id; the process knows the task by the supervisor's own id
    frames: Any
    needs: Optional[Amounts] = None
    given_at: float = 0.0  # when its process was given it (monotonic)


class Handed(NamedTuple):
    """Tasks for one process: send ``items`` to ``proc`` as one message."""

    proc: Any  # a _taskpool.TaskProcess
    items: list[Item]


class Ended(NamedTuple):
    """What a task process's end means for its tasks: ``replies`` to clients (``None``: to every
    client), and the tasks it never started, to queue again."""

    replies: list[tuple[Optional[bytes], Item]]
    unstarted: list[Queued]
    crashed: int


class Held:
    """What one process was given, in order, and what that commits it to."""

    __slots__ = ("assigned", "given", "initialized", "counts", "closing", "last_event")

    def __init__(self) -> None:
        self.assigned: collections.OrderedDict[int, Assignment] = collections.OrderedDict()
        self.given = 0
        self.initialized: set[bytes] = set()  # clients whose initializer it ran (or was sent)
        self.counts: dict[bytes, int] = {}  # tasks given per client, for max_tasks_per_child
        self.closing = False  # reached a client's max_tasks_per_child, or its initializer failed
        self.last_event = 0.0


def is_running(proc: Any) -> bool:
    return bool(proc.counters[STARTED] > proc.counters[FINISHED])


class Relay:
    """The supervisor hands out every task (a worker started by the user)."""

    direct = False

    def __init__(self, resources: Optional[Amounts] = None) -> None:
        self.held: dict[Any, Held] = {}  # by _taskpool.TaskProcess
        self.service: Optional[float] = None  # estimated seconds per task
        self.ids = 0  # the supervisor's own task ids, unique across clients
        self.resources: Amounts = dict(resources or {})  # what --resources offers
        # How long tasks ran: from when a task's process was free to start it (given it, or done with
        # the one before) to its reply (--metrics-port).
        self.durations = Histogram()
        # What the tasks given to processes hold of them, from when they are given until they end:
        # several clients may send needy tasks, and each client counts only its own.
        self.in_use: Amounts = {}

    def of(self, proc: Any) -> Held:
        held = self.held.get(proc)
        if held is None:
            held = self.held[proc] = Held()
        return held

    # Handing out ------------------------------------------------------------------------------------

    def refuses_tasks(self) -> Optional[str]:
        """Why tasks from clients are not taken here; None: they are queued."""
        return None

    def never_meets(self, needs: Amounts) -> Optional[str]:
        """Why a task that needs this cannot run here even when all is free; None if it can."""
        if _resources.covers(self.resources, needs):
            return None
        return (f"this worker offers {_resources.describe(self.resources)}; the task needs "
                f"{_resources.describe(needs)}")

    def credit(self, proc: Any) -> int:
        held = self.of(proc)
        if not proc.ready or held.closing or proc.retiring:
            return 0
        return 1 + _pacing.TO_PROCESSES.ahead(self.service) - len(held.assigned)

    def hand_out(self, queue: "collections.deque[Queued]", sessions: Sessions, procs: Sequence[Any],
                 now: float) -> list[Handed]:
        """Take queued tasks for the processes with credit, the most recently active first (its code is
        warm), each a fair share of what waits; a task of a session that is gone is dropped."""
        takers = sorted((proc for proc in procs if self.credit(proc) > 0),
                        key=lambda proc: self.of(proc).last_event, reverse=True)
        handed = []
        waiting: list[Queued] = []  # needy tasks whose resources are taken: first in line again after
        for index, proc in enumerate(takers):
            share = math.ceil(len(queue) / (len(takers) - index))
            items: list[Item] = []
            wanted = min(self.credit(proc), share)
            while queue and len(items) < wanted:
                task = queue.popleft()
                session = sessions.get(task.client)
                if session is None:
                    continue
                if task.needs is not None:
                    if not _resources.covers(_resources.free_of(self.resources, self.in_use), task.needs):
                        waiting.append(task)
                        continue
                    _resources.take(self.in_use, task.needs)
                ident, first = self.assign(proc, task, now, session.max_tasks_per_child)
                items.append(proto.process_task(ident, task.client, session.init_blob if first else b"", task.frames))
                if self.of(proc).closing:
                    break
            if items:
                handed.append(Handed(proc, items))
        queue.extendleft(reversed(waiting))
        return handed

    def assign(self, proc: Any, task: Queued, now: float, limit: Optional[int]) -> tuple[int, bool]:
        """Record a task given to ``proc``: the id the process knows it by, and whether the process
        needs the client's initializer first."""
        held = self.of(proc)
        self.ids += 1
        if not held.assigned:
            held.last_event = now
        held.assigned[self.ids] = Assignment(held.given, task.client, task.task_id, task.frames, task.needs, now)
        held.given += 1
        first = task.client not in held.initialized
        held.initialized.add(task.client)
        count = held.counts[task.client] = held.counts.get(task.client, 0) + 1
        if limit is not None and count >= limit:
            held.closing = True
        return self.ids, first

    # Replies ----------------------------------------------------------------------------------------

    def assignment(self, proc: Any, ident: int) -> Optional[Assignment]:
        return self.of(proc).assigned.get(ident)

    def finished(self, proc: Any, ident: int, now: float) -> Optional[Assignment]:
        """``proc`` replied for task ``ident``; None if it was not given that task."""
        held = self.of(proc)
        assignment = held.assigned.pop(ident, None)
        if assignment is not None:
            self.release(assignment)
            self.durations.observe(max(0.0, now - max(assignment.given_at, held.last_event)))
            self.service = _pacing.smoothed(self.service, max(0.0, now - held.last_event))
            held.last_event = now
        return assignment

    def release(self, assignment: Assignment) -> None:
        if assignment.needs is not None:
            _resources.give_back(self.in_use, assignment.needs)

    def close_after_tasks(self, proc: Any) -> None:
        self.of(proc).closing = True

    def may_retire(self, proc: Any) -> bool:
        """``proc`` is done with all it must do before it is replaced."""
        held = self.of(proc)
        return held.closing and not held.assigned and not proc.retiring

    # Looking for tasks --------------------------------------------------------------------------------

    def running(self, proc: Any) -> Optional[Assignment]:
        started, finished = proc.counters[STARTED], proc.counters[FINISHED]
        if started > finished:
            for assignment in self.of(proc).assigned.values():
                if assignment.seq == finished:
                    return assignment
        return None

    def runs_for(self, proc: Any, client: bytes) -> bool:
        running = self.running(proc)
        return running is not None and running.client == client

    def running_task(self, procs: Sequence[Any], client: bytes, ident: int, seq: Optional[int]) -> Optional[Any]:
        """The process that runs the client's task ``ident`` now, if any."""
        return next((proc for proc in procs if (running := self.running(proc)) is not None
                     and running.client == client and running.task_id == ident), None)

    def busy(self, procs: Sequence[Any]) -> int:
        return sum(bool(self.of(proc).assigned) for proc in procs)

    def idle(self, procs: Sequence[Any]) -> bool:
        """Nothing is running or waiting in any process."""
        return self.busy(procs) == 0

    # Ends -----------------------------------------------------------------------------------------------

    def forget_client(self, client: bytes) -> None:
        for held in self.held.values():
            held.initialized.discard(client)
            held.counts.pop(client, None)

    def ended(self, proc: Any, *, host: str, stopped_with_worker: bool) -> Ended:
        """``proc`` ended: CRASHED for the task it was running, LOST for finished ones whose replies died
        with it (and, stopped with its worker, for the one it ran), and the tasks it never started."""
        held = self.held.pop(proc, None) or Held()
        for assignment in held.assigned.values():
            self.release(assignment)
        if proc.retiring:  # it ended as told, with nothing left to do
            return Ended([], [], 0)
        counters = proc.counters
        started, finished = counters[STARTED], counters[FINISHED]
        pid, code = proc.process.pid, proc.process.exitcode
        signal_name, how = proto.describe_exit(code)
        replies: list[tuple[Optional[bytes], Item]] = []
        crashed = 0
        for a in held.assigned.values():
            if a.seq < finished:  # it ran; its reply died with the process: the client retries it
                reason = proto.encode_reason(f"its reply was lost when task process {pid} {how} in a later task")
                replies.append((a.client, Item(Kind.LOST, a.task_id, reason)))
            elif a.seq < started and stopped_with_worker:
                reason = proto.encode_reason(f"task process {pid} {how} while its worker was stopping")
                replies.append((a.client, Item(Kind.LOST, a.task_id, reason)))
            elif a.seq < started:
                crash = proto.encode_crash(exitcode=code, signal_name=signal_name, host=host, pid=pid,
                                           timed_out=proc.timed_out, **proc.memory_report())
                replies.append((a.client, Item(Kind.CRASHED, a.task_id, crash)))
                crashed += 1
        unstarted = [Queued(a.client, a.task_id, a.frames, a.needs) for a in held.assigned.values() if a.seq >= started]
        return Ended(replies, unstarted, crashed)

    def abandon(self, why: str) -> list[tuple[bytes, Item]]:
        """The worker stops before its processes are done: each task they were given is lost with it (the
        client sends it elsewhere), said here since no reply will come."""
        replies = []
        for held in self.held.values():
            for a in held.assigned.values():
                replies.append((a.client, Item(Kind.LOST, a.task_id, proto.encode_reason(why))))
                self.release(a)
            held.assigned.clear()
        return replies


class DirectTasks(Relay):
    """The processes take their tasks from the one client that embeds the worker: the supervisor hands
    out nothing, and tells the client (EXITED) what each process that ends had started and finished."""

    direct = True

    def refuses_tasks(self) -> Optional[str]:
        return "this worker takes tasks only from the executor that embeds it"

    def running_task(self, procs: Sequence[Any], client: bytes, ident: int, seq: Optional[int]) -> Optional[Any]:
        """Process ``ident`` (its pid), if the task it runs now is the ``seq``-th it was sent."""
        proc = next((proc for proc in procs if proc.ident == str(ident).encode()), None)
        if proc is None or seq is None or not proc.counters[STARTED] - 1 == seq >= proc.counters[FINISHED]:
            return None
        return proc

    def runs_for(self, proc: Any, client: bytes) -> bool:
        return is_running(proc)  # one client: every running task is its

    def busy(self, procs: Sequence[Any]) -> int:
        return sum(map(is_running, procs))

    def ended(self, proc: Any, *, host: str, stopped_with_worker: bool) -> Ended:
        counters = proc.counters
        if proc.retiring:
            return Ended([], [], 0)
        exited = proto.encode_exited(pid=proc.process.pid, started=counters[STARTED], finished=counters[FINISHED],
                                     exitcode=proc.process.exitcode, retired=bool(counters[RETIRED]),
                                     timed_out=proc.timed_out, host=host, **proc.memory_report())
        return Ended([(None, exited)], [], 0)
