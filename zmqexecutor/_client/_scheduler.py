"""Which task goes to which worker, and when: the client's scheduling decisions, with no sockets.

Runs in the client's I/O thread, or a user thread that holds the engine's lock (_caller).

The engine feeds it tasks, workers that become ready or are lost, and replies; it answers with
batches to send. Tasks wait in the backlog (where ``Future.cancel()`` still works) until a ready
worker has credit: its slots, plus tasks sent ahead so that a slot that frees up finds its next task
already there. How many go ahead adapts to how long the worker's tasks take (as a relaying worker
measures it and tells, PACE; else from the gaps between its replies): many for tiny tasks (so
batches fill and the round trip is hidden), none for long ones (so no task waits behind a long one
while a slot elsewhere sits idle), and more while the engine's loop is slow to come round (a
thousand workers to feed); never more than it has finished (a slow start). A worker is topped up
once half of what went ahead has run, so that it gets fewer, fuller batches. Workers take turns (round-robin); each turn sends one batch.

A task that needs resources (``options(resources=...)``) waits apart (``needy``) and goes only to a
worker whose offered amounts, less what its tasks in flight here hold, cover it: so a worker gets at
most as many as its amounts allow, and the rest wait here, not there. One that no ready worker could
ever take waits ``connect_timeout`` for one that can (``expire_unmet``).
"""

from __future__ import annotations

import collections
import itertools
import time
from concurrent.futures import Future
from typing import Any, Iterable, Optional

from .._wire import _resources
from .._wire._batching import BATCH_ITEMS, is_full
from .._wire._histogram import Histogram
from .._wire._pacing import TO_WORKERS, smoothed
from .._wire._resources import Amounts

# How far into the waiting needy tasks a worker's turn looks for ones its free resources cover: a
# task that fits nowhere now must not make every turn scan a long queue behind it.
NEEDY_LOOKAHEAD = 256

# A busy client returns to a worker only after a turn of its loop, which feeding a thousand workers
# takes milliseconds: so each worker is sent at least this many turns' worth of work ahead. More hides
# a slower loop; less keeps fewer tasks waiting at workers where another could run them sooner.
TURNS_AHEAD = 2.0


class Task:
    __slots__ = ("ident", "future", "frames", "size", "queued_at", "started", "lost_on", "keepable",
                 "function_at", "missed", "needs", "sent_at")

    def __init__(self, ident: int, future: "Future[Any]", frames: list[Any], size: int,
                 keepable: tuple[tuple[int, bytes], ...] = (), function_at: Optional[int] = None,
                 needs: Optional[Amounts] = None) -> None:
        self.ident = ident
        self.needs = needs  # of a worker's resources, held while it is in flight there
        self.future = future
        self.frames = frames
        self.size = size
        # (frame index, digest) of the buffers a worker may keep (repeated arguments', then the
        # function's): sent once per worker
        self.keepable = keepable
        # The index of the function's first buffer (they come last)
        self.function_at = len(frames) if function_at is None else function_at
        self.missed = 0  # times a worker answered MISSING
        self.queued_at = time.monotonic()
        self.started = False  # set_running_or_notify_cancel() has been called
        self.lost_on: list[str] = []
        self.sent_at = 0.0  # when it last went to a worker (monotonic)

    def apply(self, engine: Any) -> None:
        """Taken in by the I/O thread, like the other submissions (_handle's requests): queued."""
        engine.scheduler.add(self)


_task_ids = itertools.count(1)


def next_task_id() -> int:
    return next(_task_ids)


class Load:
    """The scheduler's view of one worker: its slots, its tasks in flight, its pace."""

    __slots__ = ("name", "owner", "slots", "max_task_bytes", "quota", "inflight", "ready", "in_turn", "service",
                 "busy_since", "completed", "lost", "draining", "resources", "in_use", "measured")

    def __init__(self, name: str, owner: Any = None) -> None:
        self.name = name
        self.owner = owner  # whoever sends this worker's batches: the engine's business
        self.slots = 0
        self.max_task_bytes: Optional[int] = None
        self.quota: Optional[int] = None  # tasks it may still be given (max_tasks_per_child); None: no end
        self.inflight: dict[int, Task] = {}
        self.ready = False
        self.in_turn = False
        self.service: Optional[float] = None  # estimated seconds per task per slot, from reply gaps
        self.measured: Optional[float] = None  # the same, as the worker measures it (PACE)
        self.busy_since = 0.0  # its last reply, or when its slots last all became busy
        self.completed = 0
        self.lost = 0
        self.draining = False  # it finishes what it has and takes nothing more
        self.resources: Amounts = {}  # what it offers (--resources)
        self.in_use: Amounts = {}  # what this executor's tasks in flight there hold of them

    def could_take(self, needs: Amounts) -> bool:
        """Whether it offers enough for ``needs`` at all."""
        return _resources.covers(self.resources, needs)

    def hold(self, task: Task) -> None:
        self.inflight[task.ident] = task
        if task.needs is not None:
            _resources.take(self.in_use, task.needs)

    def let_go(self, ident: int) -> Optional[Task]:
        task = self.inflight.pop(ident, None)
        if task is not None and task.needs is not None:
            _resources.give_back(self.in_use, task.needs)
        return task

    @property
    def pace(self) -> Optional[float]:
        """Seconds per task per slot: the lower of the two estimates, since each errs high. The gaps
        between replies count the time the worker waited for this client (long when it feeds a
        thousand workers); the worker's measure counts each task's hop to its process, which its
        pipelining hides (tiny tasks)."""
        if self.measured is None or self.service is None:
            return self.service if self.measured is None else self.measured
        return min(self.service, self.measured)

    @property
    def capacity(self) -> int:
        """What it may hold once it has earned it (``credit``): its slots and those sent ahead."""
        return self.slots * (1 + TO_WORKERS.ahead(self.pace))

    def credit(self, horizon: float = 0.0) -> int:
        """How many tasks it may be sent now: none while more than half of those sent ahead of its
        slots still wait there, so that it is topped up in fewer, fuller batches (a message costs
        the client tens of µs, a whole one for each task when a worker is refilled task by task)."""
        if not self.ready or self.draining:
            return 0
        # Slow start: no more ahead than it has finished. One tiny first task must not send it all that
        # waits (a second worker may be a moment from ready), and a pace from a few tasks is a guess.
        ahead = min(self.slots * TO_WORKERS.ahead(self.pace, horizon),
                    max(self.slots * TO_WORKERS.unknown, self.completed))
        if len(self.inflight) > self.slots + ahead // 2:
            return 0
        credit = self.slots + ahead - len(self.inflight)
        return credit if self.quota is None else min(credit, self.quota)


class Scheduler:
    """Backlog, credit, batches, retries and expiry for one executor; driven by its engine."""

    def __init__(self, *, max_retries: int, max_in_flight: Optional[int]) -> None:
        self.max_retries = max_retries
        self.max_in_flight = max_in_flight
        self.backlog: collections.deque[Task] = collections.deque()
        self.needy: collections.deque[Task] = collections.deque()  # tasks that need resources
        self.turns: collections.deque[Load] = collections.deque()
        self.ready_count = 0
        self.attached: dict[Load, None] = {}  # the workers that may hold tasks in flight, in order
        # No task in the backlog has waited since before this (None: the backlog is empty).
        self.waiting_since: Optional[float] = None
        # For zmqexecutor.metrics, read from its own thread (a copy of plain counters): tasks taken in,
        # tasks sent again after their worker was lost, and round trips (sent to answered).
        self.added = 0
        self.retried = 0
        self.round_trips = Histogram()
        self.turn_seconds = 0.0  # how long a turn of the engine's loop takes, smoothed

    # Tasks in -----------------------------------------------------------------------------------------

    def add(self, task: Task) -> None:
        self.added += 1
        if task.needs is not None:
            self.needy.append(task)
            return
        self.backlog.append(task)
        if self.waiting_since is None:
            self.waiting_since = task.queued_at

    @property
    def waiting(self) -> bool:
        """Whether any task waits to be sent."""
        return bool(self.backlog or self.needy)

    def cancel_backlog(self) -> None:
        """Cancel the tasks not started yet; those waiting for a retry are kept."""
        for task in (*self.backlog, *self.needy):
            if not task.started:
                task.future.cancel()
        self.backlog = collections.deque(task for task in self.backlog if task.started)
        self.needy = collections.deque(task for task in self.needy if task.started)

    def take_backlog(self) -> list[Task]:
        """Every task waiting to be sent (the needy ones too); none waits afterwards."""
        backlog, self.backlog = [*self.backlog, *self.needy], collections.deque()
        self.needy = collections.deque()
        self.waiting_since = None
        return backlog

    def take_all(self) -> list[Task]:
        """Every task the scheduler holds, in flight or waiting; it holds none afterwards."""
        tasks = self.take_backlog()
        for load in self.turns:
            load.in_turn = False
        self.turns.clear()
        return tasks

    def take_inflight(self, load: Load) -> list[Task]:
        tasks, load.inflight = list(load.inflight.values()), {}
        load.in_use = {}
        return tasks

    # Workers ------------------------------------------------------------------------------------------

    def attach(self, load: Load, slots: int, max_task_bytes: Optional[int],
               resources: Optional[Amounts] = None) -> None:
        """``load``'s worker shook hands and may take tasks."""
        load.resources = dict(resources or {})
        if not load.ready:
            self.ready_count += 1
        load.ready = True
        load.draining = False
        self.attached[load] = None
        load.slots = slots
        load.max_task_bytes = max_task_bytes
        self.offer(load)

    def detach(self, load: Load, why: str, *, retry: bool = True) -> list[tuple[Task, str]]:
        """``load``'s worker is lost: its tasks in flight go back to the front of the backlog, except
        those lost too often already (or all, without ``retry``), returned with their history."""
        if load.ready:
            self.ready_count -= 1
        load.ready = False
        self.attached.pop(load, None)
        if not (load.draining and not load.inflight):  # one that drained and left as it said was not lost
            load.lost += 1
        return self.retry(load, sorted(self.take_inflight(load), key=lambda t: t.ident), retry=retry)

    def retry(self, load: Load, tasks: list[Task], *, retry: bool = True) -> list[tuple[Task, str]]:
        """Send ``tasks``, lost with ``load``'s worker, again: first in line, unless they were lost
        too often already (or not at all, without ``retry``); those are returned with their history."""
        now = time.monotonic()
        failed, retried = [], []
        for task in tasks:
            task.lost_on.append(load.name)
            if not retry or len(task.lost_on) > self.max_retries:
                failed.append((task, ", ".join(task.lost_on)))
            else:
                task.queued_at = now
                retried.append(task)
        self.retried += len(retried)
        self.put_first(retried)
        return failed

    def put_first(self, tasks: list[Task]) -> None:
        """``tasks`` first in line again, in their order."""
        self.needy.extendleft(reversed([task for task in tasks if task.needs is not None]))
        plain = [task for task in tasks if task.needs is None]
        self.backlog.extendleft(reversed(plain))
        if plain and self.waiting_since is None:
            self.waiting_since = plain[0].queued_at

    def turn_took(self, seconds: float) -> None:
        """The engine's loop took ``seconds`` to go round once, not counting its wait for input."""
        self.turn_seconds = smoothed(self.turn_seconds, seconds)

    @property
    def horizon(self) -> float:
        return TURNS_AHEAD * self.turn_seconds

    def offer(self, load: Load) -> None:
        if load.ready and not load.in_turn and load.credit(self.horizon) > 0:
            load.in_turn = True
            self.turns.append(load)

    @property
    def in_flight(self) -> int:
        """Tasks sent and not answered yet: what the attached workers' loads hold (only an attached
        worker holds tasks: one detached gives them back)."""
        # list(): a caller's thread reads this as a hint without the engine's lock (_caller).
        return sum(len(load.inflight) for load in list(self.attached))

    def has_ready_worker(self) -> bool:
        return self.ready_count > 0

    # Dispatch -----------------------------------------------------------------------------------------

    def next_batches(self, now: float) -> tuple[list[tuple[Load, list[Task]]], list[tuple[Task, Load]]]:
        """The batches to send now, each marked in flight; and tasks too large for the worker whose
        turn it was (to be failed). Cancelled tasks are dropped."""
        batches: list[tuple[Load, list[Task]]] = []
        too_large: list[tuple[Task, Load]] = []
        room = None if self.max_in_flight is None else self.max_in_flight - self.in_flight
        passed: list[Load] = []  # had a turn and took nothing: only needy tasks it cannot take wait
        while (self.backlog or self.needy) and self.turns:
            if room is not None and room <= 0:
                break
            load = self.turns.popleft()
            load.in_turn = False
            credit = load.credit(self.horizon)
            if credit <= 0:
                continue
            # A fair share of what waits, so that the next workers in turn get some of it too.
            share = -(-(len(self.backlog) + len(self.needy)) // (len(self.turns) + 1))
            limit = min(credit, BATCH_ITEMS, share, room if room is not None else credit)
            waited = len(self.backlog) + len(self.needy)
            batch = self.take_batch(load, limit, too_large)
            if batch:
                if len(load.inflight) < load.slots:
                    # Its slots are all busy from now at the earliest: the time it waited for this
                    # batch (the client's own delay, when feeding many workers) is not its tasks'.
                    load.busy_since = now
                for task in batch:
                    load.hold(task)
                    task.sent_at = now
                if room is not None:
                    room -= len(batch)
                if load.quota is not None:
                    load.quota -= len(batch)
                batches.append((load, batch))
            if batch or len(self.backlog) + len(self.needy) < waited:
                self.offer(load)
            else:
                passed.append(load)
        for load in passed:
            self.offer(load)
        return batches, too_large

    def take_batch(self, load: Load, limit: int, too_large: list[tuple[Task, Load]]) -> list[Task]:
        batch: list[Task] = []
        size = 0
        if self.needy and load.resources:
            size = self.take_needy(load, limit, batch, too_large)
        while self.backlog and len(batch) < limit:
            task = self.backlog[0]
            if is_full(len(batch), size, task.size):
                break
            self.backlog.popleft()
            if self.admit(task, load, too_large):
                batch.append(task)
                size += task.size
        return batch

    def take_needy(self, load: Load, limit: int, batch: list[Task], too_large: list[tuple[Task, Load]]) -> int:
        """Into ``batch``, the needy tasks (among the first NEEDY_LOOKAHEAD) that ``load``'s free
        resources cover, holding them as they go; returns their size."""
        size = 0
        skipped: list[Task] = []
        free = _resources.free_of(load.resources, load.in_use)
        for _ in range(min(NEEDY_LOOKAHEAD, len(self.needy))):
            if len(batch) >= limit:
                break
            task = self.needy.popleft()
            assert task.needs is not None
            if not _resources.covers(free, task.needs):
                skipped.append(task)
                continue
            if is_full(len(batch), size, task.size):
                skipped.append(task)
                break
            if self.admit(task, load, too_large):
                for name, amount in task.needs.items():
                    free[name] -= amount
                batch.append(task)
                size += task.size
        self.needy.extendleft(reversed(skipped))
        return size

    def admit(self, task: Task, load: Load, too_large: list[tuple[Task, Load]]) -> bool:
        """Whether ``task``, taken out of line, goes to ``load`` (not cancelled, not too large)."""
        if load.max_task_bytes is not None and task.size > load.max_task_bytes:
            too_large.append((task, load))
            return False
        if not task.started:
            if not task.future.set_running_or_notify_cancel():
                return False
            task.started = True
        elif task.future.done():  # waiting for a retry, and cancelled by force meanwhile
            return False
        return True

    def unsent(self, load: Load, batch: Iterable[Task]) -> None:
        """A batch could not be sent (the worker disconnected since its last message): back it goes."""
        self.requeue([task for task in batch if load.let_go(task.ident) is not None])

    def returned(self, load: Load, ident: int) -> None:
        """``load``'s worker gave task ``ident`` back unstarted (it drains, or it let go of a buffer the
        task named): first in line again, no retry counted; the worker has that credit back."""
        task = load.let_go(ident)
        if task is not None:
            self.requeue([task])
            self.offer(load)

    def requeue(self, tasks: list[Task]) -> None:
        """Tasks taken back from a worker that never started them: first in line again, no retry counted."""
        now = time.monotonic()
        for task in tasks:
            task.queued_at = now
        self.put_first(tasks)

    def locate(self, future: "Future[Any]") -> Optional[tuple[Load, Task, int]]:
        """The worker ``future``'s task is in flight on, the task, and its place among that worker's
        tasks in flight (the order they were sent in); None if it is not in flight."""
        for load in self.attached:
            for position, task in enumerate(load.inflight.values()):
                if task.future is future:
                    return load, task, position
        return None

    # Replies ------------------------------------------------------------------------------------------

    def finished(self, load: Load, ident: int, now: float) -> Optional[Task]:
        """The task ``ident`` has its answer from ``load``'s worker; None if it is not in flight there
        (a late or duplicate reply)."""
        saturated = len(load.inflight) >= load.slots
        task = load.let_go(ident)
        if task is None:
            return None
        load.completed += 1
        self.round_trips.observe(max(0.0, now - task.sent_at))
        if saturated:
            # With every slot busy since the last reply, slots x gap is one task's duration; replies
            # that arrive together give gaps of zero, which the average spreads over the batch.
            sample = (now - load.busy_since) * load.slots
            load.service = smoothed(load.service, sample)
        load.busy_since = now
        if not load.in_turn:
            self.offer(load)
        return task

    def paced(self, load: Load, seconds: float) -> None:
        """``load``'s worker measured how long its tasks run (PACE). Without it, feeding a thousand
        workers, the gaps between replies (which count the time a worker waited for this client)
        made short tasks look long, so that every task went in a message of its own."""
        load.measured = seconds

    # Waiting ------------------------------------------------------------------------------------------

    def expire(self, now: float, timeout: Optional[float]) -> list[Task]:
        """The tasks that waited ``timeout`` seconds with no worker ready, taken out of the backlog."""
        deadline = self.next_expiry(timeout)
        if deadline is None or now < deadline:
            return []
        expired = [task for task in self.backlog if now - task.queued_at >= timeout]  # type: ignore[operator]
        self.backlog = collections.deque(task for task in self.backlog if now - task.queued_at < timeout)  # type: ignore[operator]
        self.waiting_since = min((task.queued_at for task in self.backlog), default=None)
        return expired

    def next_expiry(self, timeout: Optional[float]) -> Optional[float]:
        """When the oldest waiting task may expire, if no worker is ready to take it."""
        if timeout is None or not self.backlog or self.ready_count or self.waiting_since is None:
            return None
        return self.waiting_since + timeout

    def unmet(self) -> list[Task]:
        """The needy tasks that no ready worker offers enough for (looked at once per distinct need)."""
        if not self.needy:
            return []
        ready = [load for load in self.attached if load.ready and not load.draining]
        met: dict[tuple[tuple[str, float], ...], bool] = {}
        unmet = []
        for task in self.needy:
            assert task.needs is not None
            key = tuple(sorted(task.needs.items()))
            if key not in met:
                met[key] = any(load.could_take(task.needs) for load in ready)
            if not met[key]:
                unmet.append(task)
        return unmet

    def expire_unmet(self, now: float, timeout: Optional[float]) -> list[Task]:
        """The needy tasks that no ready worker could take, waiting for one for ``timeout`` seconds,
        taken out of line. Looked at once per heartbeat (the engine's tick), not per turn: it reads
        every needy task."""
        if timeout is None:
            return []
        expired = [task for task in self.unmet() if now - task.queued_at >= timeout]
        if expired:
            gone = {id(task) for task in expired}
            self.needy = collections.deque(task for task in self.needy if id(task) not in gone)
        return expired

    def offered(self) -> list[tuple[str, Amounts]]:
        """What each ready worker offers, by name."""
        return [(load.name, load.resources) for load in self.attached if load.ready]
