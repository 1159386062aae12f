"""The worker's task processes: start, reap and replace them, signal them, enforce time limits.
Which process runs which task is the relay's business (_relay).

Runs in the supervisor's loop thread.

Relayed (a worker started by the user), the processes connect to the pool's Listener; direct (the
embedded worker), they connect to the client itself, and the pool knows them only by their process
and the counters they keep in shared memory.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any, Optional

from .._wire import _protocol as proto
from .._wire._channel import Listener, Peer
from .._wire._memory import OomKills, format_size, resident_bytes
from .._wire._protocol import Item, Kind
from ._taskprocess import (
    COUNTERS,
    DEADLINE,
    DRAINING,
    FINISHED,
    LIMIT_MS,
    OVER_MEMORY,
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

# A task past its time limit gets SIGTERM, then SIGKILL this much later if its process still lives
# (a task may have installed a handler of its own, or be stuck in code that holds off signals).
TIME_LIMIT_GRACE = 2.0

# While tasks run, the pool looks this often for one that started with a time limit (the task process
# sets it in shared memory; no message says so). A task therefore ends at most this late.
TIME_LIMIT_CHECK = 0.1

# With a memory limit, the pool reads the resident size of each process that runs a task this often.
# Shorter stops a runaway allocation sooner (a process can take a few hundred MiB more meanwhile) and
# costs the supervisor a read of /proc per process each time (about 20 us).
MEMORY_CHECK = 0.1


class TaskProcess:
    __slots__ = ("process", "ident", "ready", "counters", "retiring", "signalled", "peer", "timed_out", "kill_at",
                 "peak", "over_limit", "oom_killed", "oom_mark")

    def __init__(self, process: Any, counters: Any) -> None:
        self.process = process
        self.ident = str(process.pid).encode()
        self.ready = False
        self.counters = counters  # [started, finished, ...], written by the process (_taskprocess)
        self.retiring = False  # told to stop once its tasks are done; a replacement started
        self.signalled = False  # stopped by the supervisor, for its client
        self.peer: Optional[Peer] = None  # its connection, once it said READY
        self.timed_out: Optional[float] = None  # the limit (s) its running task overran: it is being ended
        self.kill_at = 0.0
        self.peak = 0  # the largest resident size seen while a memory limit is watched (bytes)
        self.over_limit: Optional[int] = None  # the memory limit it passed: it was killed for it
        self.oom_killed = False  # the kernel's out-of-memory killer took it, by its control group's count
        self.oom_mark = 0  # that count when the process started

    def enforce_memory_limit(self, limit: int) -> bool:
        """SIGKILL the process if it runs a task and holds more than ``limit`` bytes; whether it runs one.
        No grace: a process past its limit may be taking the host's memory fast."""
        counters = self.counters
        if counters[STARTED] == counters[FINISHED] or self.over_limit is not None or self.process.pid is None:
            return False
        size = resident_bytes(self.process.pid)
        if size is None:
            return False
        self.peak = max(self.peak, size)
        if size > limit and counters[STARTED] > counters[FINISHED]:
            self.over_limit = limit
            logger.warning("task process %s holds %s, above its memory limit of %s; stopping it",
                           self.process.pid, format_size(size), format_size(limit))
            _signal(self, signal.SIGKILL)
        return True

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

    def memory_report(self) -> dict[str, Any]:
        """What a crash report says of its memory: the limit it passed (bytes), the largest resident size
        seen, and whether the kernel's out-of-memory killer took it; only what is known."""
        found: dict[str, Any] = {}
        if self.over_limit is not None:
            found["memory_limit"] = self.over_limit
        if self.peak:
            found["peak_memory"] = self.peak
        if self.oom_killed:
            found["oom_killed"] = True
        return found


class TaskProcessPool:
    """The worker's task processes: started, reaped, replaced and signalled here."""

    def __init__(self, address: str, mp: Any, *, direct: bool = False, spin: bool = False,
                 memory_per_child: Optional[int] = None, memory_limit: Optional[int] = None) -> None:
        """``direct``: the processes connect to the client at ``address`` (the embedded worker);
        ``spin``: they look for their next task awake a moment after each reply (when each has a CPU
        of its own); ``memory_per_child``: a process larger than this after a task is replaced before
        its next; ``memory_limit``: one larger than this while it runs a task is killed."""
        self.address = address
        self.memory_per_child = memory_per_child
        self.memory_limit = memory_limit
        self.memory_due = 0.0  # when to read the running processes' sizes again; 0: none runs
        self.oom = OomKills()
        self.spin = spin
        self.mp = mp
        self.direct = direct
        self.by_ident: dict[bytes, TaskProcess] = {}
        self.by_sentinel: dict[int, TaskProcess] = {}
        self.startup_failures = 0
        self.timed_out = 0  # tasks ended for running past their time limit
        self.draining = False  # the worker is going away: what dies now is not replaced
        self.listener: Optional[Listener] = None

    def open(self) -> None:
        """The socket the processes connect to when relayed (in direct mode they connect to the client)."""
        if not self.direct:
            self.listener = Listener(self.address, reuse_buffers=True)

    def procs(self) -> list[TaskProcess]:
        return list(self.by_ident.values())

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
            counters[DRAINING] = self.draining
            # The embedded worker's processes print into the user's terminal through the client only.
            process = context.Process(target=task_process_main,
                                      args=(self.address, os.getpid(), counters, not self.direct, self.spin,
                                            not self.direct, self.memory_per_child),
                                      name="zmqexecutor-task", daemon=True)
            process.start()
            proc = TaskProcess(process, counters)
            proc.oom_mark = self.oom.read()
            self.by_ident[proc.ident] = proc
            self.by_sentinel[process.sentinel] = proc

    def mark_draining(self) -> None:
        """From now on a SIGTERM that reaches the processes from outside leaves their tasks running."""
        self.draining = True
        for proc in self.by_ident.values():
            proc.counters[DRAINING] = 1

    def retire(self, proc: TaskProcess) -> None:
        """Stop ``proc`` once the tasks it has are done; a replacement starts now."""
        if not self.send(proc, proto.encode_bare(Kind.STOP)):
            _signal(proc, signal.SIGTERM)
        proc.retiring = True
        if not self.draining:
            self.start(1)

    def stop_for_client(self, proc: TaskProcess, sig: signal.Signals, why: str) -> None:
        """Signal ``proc``, which runs a task whose client wants it stopped."""
        if proc.process.pid is not None:
            logger.info("stopping task process %d %s", proc.process.pid, why)
            proc.signalled = True
            _signal(proc, sig)

    def enforce_limits(self, now: float) -> Optional[float]:
        """End the processes whose task ran past its time limit (SIGTERM, later SIGKILL) or past the
        memory limit (SIGKILL); returns when to look again (a monotonic time), or None while no task runs."""
        dues = [due for proc in self.by_ident.values() if (due := proc.enforce_time_limit(now)) is not None]
        if self.memory_limit is not None:
            if now >= self.memory_due:
                limit = self.memory_limit
                watched = [proc.enforce_memory_limit(limit) for proc in self.by_ident.values()]
                self.memory_due = now + MEMORY_CHECK if any(watched) else 0.0
            if self.memory_due:
                dues.append(self.memory_due)
        return min(dues, default=None)

    def reap(self, fd: int) -> tuple[TaskProcess, bool]:
        """A task process ended: it, and whether it was killed from outside while the worker is
        being stopped (no fault of its task's). A replacement starts unless it ended on purpose or
        the worker is draining."""
        proc = self.by_sentinel.pop(fd)
        del self.by_ident[proc.ident]
        proc.process.join()
        if proc.retiring:
            return proc, False
        if proc.ready or proc.counters[UP]:
            self.startup_failures = 0
        else:
            self.startup_failures += 1
        started, finished = proc.counters[STARTED], proc.counters[FINISHED]
        pid = proc.process.pid
        signal_name, how = proto.describe_exit(proc.process.exitcode)
        self.timed_out += proc.timed_out is not None
        if signal_name == "SIGKILL" and proc.over_limit is None and not proc.signalled:
            proc.oom_killed = self.oom.read() > proc.oom_mark
            how += " (the kernel's out-of-memory killer)" if proc.oom_killed else ""
        if proc.counters[OVER_MEMORY]:
            logger.info("task process %d held %s after a task, above max_memory_per_child (%s); replacing it",
                        pid, format_size(proc.counters[OVER_MEMORY]), format_size(self.memory_per_child or 0))
        # Killed from outside while the worker is being stopped (SIGKILL after Slurm's KillWait, say): the
        # task went with its worker, which is no fault of the task's.
        stopped_with_worker = (self.draining and signal_name in ("SIGKILL", "SIGTERM") and not proc.signalled
                               and proc.timed_out is None)
        replacing = "; not replaced: the worker is stopping" if self.draining else "; replacing it"
        if started > finished:
            # Expected when we stopped it for its client, or with its worker; news otherwise.
            expected = proc.signalled or proc.timed_out is not None or stopped_with_worker or proc.over_limit is not None
            logger.log(logging.INFO if expected else logging.WARNING,
                       "task process %d %s while running a task%s", pid, how, replacing)
        elif not proc.counters[RETIRED]:
            logger.warning("idle task process %d %s%s", pid, how, replacing)
        if not self.draining:
            self.start(1)
        return proc, stopped_with_worker

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
