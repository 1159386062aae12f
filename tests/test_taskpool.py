"""The worker's task-process bookkeeping: start, reap, replace, retire, time limits; driven with
processes that only record being started (no process runs, no signal reaches one)."""

from __future__ import annotations

import time

from workerfakes import FakeContext

from zmqexecutor._worker._taskpool import MAX_STARTUP_FAILURES, TIME_LIMIT_GRACE, TaskProcessPool
from zmqexecutor._worker._taskprocess import DEADLINE, DRAINING, FINISHED, LIMIT_MS, STARTED, TERM_OK, UP


def pool(count: int) -> TaskProcessPool:
    found = TaskProcessPool("unused", FakeContext)
    found.start(count)
    return found


def test_a_process_that_ends_is_replaced_unless_the_worker_drains() -> None:
    p = pool(2)
    first = p.procs()[0]
    first.ready = True
    first.process.exitcode = -9
    reaped, stopped_with_worker = p.reap(first.process.sentinel)
    assert reaped is first and not stopped_with_worker
    assert len(p.procs()) == 2 and first not in p.procs()  # a replacement started
    p.mark_draining()
    assert all(proc.counters[DRAINING] for proc in p.procs())
    second = p.procs()[0]
    second.process.exitcode = -9
    assert p.reap(second.process.sentinel) == (second, True)  # killed from outside during the drain
    assert len(p.procs()) == 1


def test_processes_that_die_before_they_start_are_counted_until_one_starts() -> None:
    p = pool(1)
    for failures in range(1, MAX_STARTUP_FAILURES + 1):
        proc = p.procs()[0]
        proc.process.exitcode = 1
        p.reap(proc.process.sentinel)
        assert p.startup_failures == failures
    proc = p.procs()[0]
    proc.counters[UP] = 1
    proc.process.exitcode = 1
    p.reap(proc.process.sentinel)
    assert p.startup_failures == 0


def test_retiring_a_process_it_cannot_tell_signals_it_as_expected_and_starts_another() -> None:
    p = pool(1)
    proc = p.procs()[0]
    p.retire(proc)  # not connected: SIGTERM, marked as ours so that it dies of it at once
    assert proc.retiring and proc.counters[TERM_OK] == 1
    assert len(p.procs()) == 2
    proc.process.exitcode = 0
    p.reap(proc.process.sentinel)
    assert len(p.procs()) == 1  # no replacement for one that retired: it had one already


def test_a_task_past_its_time_limit_gets_sigterm_then_sigkill() -> None:
    p = pool(1)
    proc = p.procs()[0]
    now = time.monotonic()
    assert p.enforce_limits(now) is None  # nothing runs
    proc.counters[STARTED], proc.counters[FINISHED] = 1, 0
    proc.counters[DEADLINE] = int((now + 1.0) * 1e9)
    proc.counters[LIMIT_MS] = 1500
    assert abs(p.enforce_limits(now) - (now + 1.0)) < 1e-3  # looked at again at its deadline
    due = p.enforce_limits(now + 1.0)
    assert proc.timed_out == 1.5 and proc.counters[TERM_OK] == 1
    assert due == now + 1.0 + TIME_LIMIT_GRACE
    proc.process.exitcode = -15
    p.reap(proc.process.sentinel)
    assert p.timed_out == 1
