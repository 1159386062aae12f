"""The client's scheduling decisions, driven directly: no sockets, no processes."""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from zmqexecutor._wire import _batching, _pacing
from zmqexecutor._client._scheduler import Load, Scheduler, Task


def task(ident: int, size: int = 10) -> Task:
    return Task(ident, Future(), [b"x" * size], size)


def ready(scheduler: Scheduler, name: str, slots: int, max_task_bytes: int | None = None) -> Load:
    load = Load(name)
    scheduler.attach(load, slots, max_task_bytes)
    return load


def sent(batches: list[tuple[Load, list[Task]]]) -> list[tuple[str, list[int]]]:
    return [(load.name, [t.ident for t in batch]) for load, batch in batches]


def test_a_lone_task_goes_at_once_as_a_batch_of_one() -> None:
    s = Scheduler(max_retries=2, max_in_flight=None)
    w = ready(s, "w", slots=2)
    s.add(task(1))
    batches, too_large = s.next_batches(0.0)
    assert sent(batches) == [("w", [1])] and not too_large
    assert batches[0][1][0].future.running()
    assert s.in_flight == 1 and list(w.inflight) == [1]


def test_queued_tasks_go_together_within_credit_and_round_robin() -> None:
    s = Scheduler(max_retries=2, max_in_flight=None)
    a, b = ready(s, "a", slots=2), ready(s, "b", slots=2)
    for i in range(20):
        s.add(task(i))
    batches, _ = s.next_batches(0.0)
    # Nothing known of the tasks yet: each worker gets its slots plus one ahead per slot.
    assert sent(batches) == [("a", [0, 1, 2, 3]), ("b", [4, 5, 6, 7])]
    assert a.credit() == b.credit() == 0
    assert len(s.backlog) == 12


def test_short_tasks_earn_deep_credit_and_long_ones_none_ahead() -> None:
    s = Scheduler(max_retries=2, max_in_flight=None)
    w = ready(s, "w", slots=2)
    assert w.capacity == 4
    w.service = 10e-6
    assert w.capacity == 2 * (1 + _pacing.MAX_AHEAD_PER_SLOT)
    w.service = 1e-3
    assert w.capacity == 2 * (1 + int(_pacing.TO_WORKERS.horizon / 1e-3))
    w.service = 0.5
    assert w.capacity == 2  # a long task never waits behind another


def one_slot_sent(tasks: int, at: float) -> tuple[Scheduler, Load]:
    """A scheduler with one single-slot worker, sent what it takes of ``tasks`` tasks at ``at``."""
    s = Scheduler(max_retries=2, max_in_flight=None)
    w = ready(s, "w", slots=1)
    for i in range(tasks):
        s.add(task(i))
    s.next_batches(at)
    return s, w


def test_the_pace_is_learned_from_replies_while_every_slot_is_busy() -> None:
    s, w = one_slot_sent(2, at=10.0)
    assert s.finished(w, 0, 10.5) is not None
    assert w.service == pytest.approx(0.5)
    assert w.capacity == 1


def test_the_lower_of_the_workers_measure_and_the_gaps_between_its_replies_paces_it() -> None:
    s, w = one_slot_sent(3, at=10.0)
    s.paced(w, 0.001)  # PACE: its tasks run for 1 ms
    # A reply 0.5 s after the last: the worker waited for this client (busy with a thousand others),
    # which says nothing of its tasks.
    assert s.finished(w, 0, 10.5) is not None
    assert w.service == pytest.approx(0.5) and w.pace == 0.001
    assert w.capacity == 1 + int(_pacing.TO_WORKERS.horizon / 0.001)
    # Replies that come together (tiny tasks, pipelined) make gaps shorter than the worker's measure,
    # which counts each task's hop to its process: then the gaps are the truth.
    w.service = 0.0002
    assert w.pace == 0.0002


def test_a_gap_counts_only_from_when_every_slot_had_a_task() -> None:
    s = Scheduler(max_retries=2, max_in_flight=None)
    w = ready(s, "w", slots=1)
    w.service = 0.5  # one task at a time
    s.add(task(1))
    s.next_batches(10.0)
    assert s.finished(w, 1, 10.5) is not None
    s.add(task(2))
    s.next_batches(12.0)  # the client came back to it 1.5 s after its reply
    assert s.finished(w, 2, 12.5) is not None
    assert w.service == pytest.approx(0.5)  # not 0.5 + 0.1 x (2 - 0.5)


def test_a_worker_earns_tasks_ahead_by_finishing_tasks() -> None:
    s = Scheduler(max_retries=2, max_in_flight=None)
    w = ready(s, "w", slots=1)
    s.paced(w, 1e-5)  # its first task was tiny: 500 could go ahead of its slot, were it sure
    for i in range(100):
        s.add(task(i))
    sizes = []
    for ident in range(4):
        batches, _ = s.next_batches(0.0)
        sizes.append(sum(len(batch) for _, batch in batches))
        for done in list(w.inflight):
            s.finished(w, done, 0.0)
    # One ahead while it has finished none, then as many ahead as it has finished.
    assert sizes == [2, 3, 6, 12]


def test_a_worker_with_tasks_ahead_is_topped_up_once_half_of_them_ran() -> None:
    s = Scheduler(max_retries=2, max_in_flight=None)
    w = ready(s, "w", slots=1)
    w.completed = 1_000  # past its slow start
    step = _pacing.TO_WORKERS.horizon / 8.5  # eight go ahead of its one slot
    s.paced(w, step)
    for i in range(40):
        s.add(task(i))
    batches, _ = s.next_batches(0.0)
    assert [len(batch) for _, batch in batches] == [9]
    topped_up = []
    for ident in range(9):
        s.finished(w, ident, step * (ident + 1))  # replies as far apart as it says its tasks take
        batches, _ = s.next_batches(step * (ident + 1))
        topped_up.append(sum(len(batch) for _, batch in batches))
    # None while more than four (half of those ahead) wait behind the running one; then four at once,
    # not one after each reply.
    assert topped_up == [0, 0, 0, 4, 0, 0, 0, 4, 0]


def test_a_busy_loop_sends_more_ahead_so_a_worker_does_not_run_dry_between_its_turns() -> None:
    s = Scheduler(max_retries=2, max_in_flight=None)
    w = ready(s, "w", slots=1)
    w.completed = 1_000
    s.paced(w, 0.001)
    quiet = w.credit(s.horizon)
    for _ in range(100):
        s.turn_took(0.02)  # each turn of the loop takes 20 ms
    assert quiet == 1 + int(_pacing.TO_WORKERS.horizon / 0.001)
    assert w.credit(s.horizon) == 1 + int(s.horizon / 0.001) > 30


def test_batches_are_bounded_by_count_and_bytes() -> None:
    s = Scheduler(max_retries=2, max_in_flight=None)
    w = ready(s, "w", slots=2)
    w.service, w.completed = 1e-6, 1_000
    for i in range(_batching.BATCH_ITEMS + 5):
        s.add(task(i))
    batches, _ = s.next_batches(0.0)
    assert [len(b) for _, b in batches] == [_batching.BATCH_ITEMS, 5]

    s = Scheduler(max_retries=2, max_in_flight=None)
    w = ready(s, "w", slots=1)
    w.service, w.completed = 1e-6, 1_000
    big = _batching.BATCH_BYTES // 2 + 1
    for i in range(3):
        s.add(task(i, size=big))
    batches, _ = s.next_batches(0.0)
    assert [len(b) for _, b in batches] == [1, 1, 1]


def test_cancelled_tasks_are_dropped_and_too_large_ones_returned() -> None:
    s = Scheduler(max_retries=2, max_in_flight=None)
    ready(s, "w", slots=4, max_task_bytes=100)
    cancelled, huge, fine = task(1), task(2, size=101), task(3)
    assert cancelled.future.cancel()
    for t in (cancelled, huge, fine):
        s.add(t)
    batches, too_large = s.next_batches(0.0)
    assert sent(batches) == [("w", [3])]
    assert [(t.ident, load.name) for t, load in too_large] == [(2, "w")]


def test_max_in_flight_caps_what_is_sent() -> None:
    s = Scheduler(max_retries=2, max_in_flight=3)
    ready(s, "w", slots=8)
    for i in range(10):
        s.add(task(i))
    batches, _ = s.next_batches(0.0)
    assert sum(len(b) for _, b in batches) == 3


def test_a_lost_worker_gives_its_tasks_back_first_in_line_until_retries_run_out() -> None:
    s = Scheduler(max_retries=1, max_in_flight=None)
    a = ready(s, "a", slots=2)
    for i in range(6):
        s.add(task(i))
    s.next_batches(0.0)
    assert s.detach(a, "gone") == []
    assert [t.ident for t in s.backlog] == [0, 1, 2, 3, 4, 5] and s.in_flight == 0
    assert not s.has_ready_worker()
    b = ready(s, "b", slots=1)
    s.next_batches(0.0)
    failed = s.detach(b, "gone too")
    assert [(t.ident, lost_on) for t, lost_on in failed] == [(0, "a, b"), (1, "a, b")]
    assert [t.ident for t in s.backlog] == [2, 3, 4, 5]


def test_a_task_whose_reply_was_lost_is_retried_once_per_allowed_retry() -> None:
    s = Scheduler(max_retries=1, max_in_flight=None)
    w = ready(s, "w", slots=1)
    s.add(task(7))
    s.next_batches(0.0)
    t = s.finished(w, 7, 1.0)
    assert t is not None and s.retry(w, [t]) == [] and [x.ident for x in s.backlog] == [7]
    s.next_batches(1.0)
    t = s.finished(w, 7, 2.0)
    assert t is not None and [x.ident for x, _ in s.retry(w, [t])] == [7]


def test_late_and_duplicate_replies_are_not_tasks() -> None:
    s = Scheduler(max_retries=2, max_in_flight=None)
    w = ready(s, "w", slots=1)
    s.add(task(1))
    s.next_batches(0.0)
    assert s.finished(w, 1, 0.1) is not None
    assert s.finished(w, 1, 0.2) is None
    assert s.finished(w, 99, 0.2) is None
    assert s.in_flight == 0


def test_unsent_batches_go_back_in_order() -> None:
    s = Scheduler(max_retries=2, max_in_flight=None)
    w = ready(s, "w", slots=2)
    for i in range(3):
        s.add(task(i))
    (load, batch), = s.next_batches(0.0)[0]
    s.unsent(load, batch)
    assert [t.ident for t in s.backlog] == [0, 1, 2] and not w.inflight and s.in_flight == 0


def test_tasks_expire_only_while_no_worker_is_ready() -> None:
    s = Scheduler(max_retries=2, max_in_flight=None)
    old, new = task(1), task(2)
    old.queued_at, new.queued_at = 100.0, 104.0
    s.add(old)
    s.add(new)
    assert s.next_expiry(5.0) == 105.0
    assert s.expire(104.9, 5.0) == []
    assert s.expire(105.0, 5.0) == [old] and list(s.backlog) == [new]
    assert s.expire(105.0, None) == []
    ready(s, "w", slots=1)
    assert s.next_expiry(5.0) is None and s.expire(200.0, 5.0) == []


def test_cancel_backlog_keeps_tasks_waiting_for_a_retry() -> None:
    s = Scheduler(max_retries=2, max_in_flight=None)
    w = ready(s, "w", slots=1)
    s.add(task(1))
    s.next_batches(0.0)
    s.detach(w, "gone")
    fresh = task(2)
    s.add(fresh)
    s.cancel_backlog()
    assert [t.ident for t in s.backlog] == [1] and fresh.future.cancelled()


def test_a_quota_caps_what_a_worker_is_ever_given() -> None:
    s = Scheduler(max_retries=2, max_in_flight=None)
    w = Load("w")
    w.quota = 3  # max_tasks_per_child, for one task process
    s.attach(w, 1, None)
    for i in range(10):
        s.add(task(i))
    assert sent(s.next_batches(0.0)[0]) == [("w", [0, 1])]
    s.finished(w, 0, 0.1)
    s.finished(w, 1, 0.2)
    assert sent(s.next_batches(0.2)[0]) == [("w", [2])]
    s.finished(w, 2, 0.3)
    assert w.quota == 0 and w.credit() == 0 and s.next_batches(0.3)[0] == []
    assert len(s.backlog) == 7


def test_requeued_tasks_go_first_and_count_no_retry() -> None:
    s = Scheduler(max_retries=0, max_in_flight=None)
    ready(s, "w", slots=1)
    for i in range(4):
        s.add(task(i))
    (load, batch), = s.next_batches(0.0)[0]
    assert s.take_inflight(load) == batch
    s.requeue(batch)
    assert [t.ident for t in s.backlog] == [0, 1, 2, 3]
    assert all(t.lost_on == [] for t in batch) and s.in_flight == 0


def test_a_task_given_back_goes_first_and_its_worker_gets_the_credit_back() -> None:
    s = Scheduler(max_retries=0, max_in_flight=None)
    w = ready(s, "w", slots=1)
    for i in range(3):
        s.add(task(i))
    [(_, batch)], _ = s.next_batches(0.0)
    assert [t.ident for t in batch] == [0, 1]  # its slot, and one ahead
    assert s.next_batches(0.0) == ([], [])  # no credit left
    s.returned(w, 0)  # e.g. MISSING: it no longer kept a buffer the task named
    [(_, again)], _ = s.next_batches(0.0)
    assert [t.ident for t in again] == [0] and again[0].lost_on == []
