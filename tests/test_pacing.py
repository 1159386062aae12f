"""How far ahead tasks go, from how long they take: the one rule both hops use (no sockets)."""

from __future__ import annotations

import pytest

from zmqexecutor._wire._pacing import LONG_TASK_SECONDS, MAX_AHEAD_PER_SLOT, TO_PROCESSES, TO_WORKERS, smoothed


def test_unknown_tasks_go_one_ahead_to_a_worker_and_none_to_a_process() -> None:
    assert TO_WORKERS.ahead(None) == 1
    assert TO_PROCESSES.ahead(None) == 0


def test_the_count_ahead_covers_the_horizon_within_its_bounds() -> None:
    assert TO_WORKERS.ahead(1e-3) == int(TO_WORKERS.horizon / 1e-3)
    assert TO_PROCESSES.ahead(1e-4) == int(TO_PROCESSES.horizon / 1e-4)
    assert TO_WORKERS.ahead(1e-9) == TO_PROCESSES.ahead(0.0) == MAX_AHEAD_PER_SLOT
    # Shorter than a long task but longer than the horizon: a worker still gets one, a process none.
    assert TO_WORKERS.ahead(0.01) == 1 and TO_PROCESSES.ahead(0.01) == 0
    assert TO_WORKERS.ahead(LONG_TASK_SECONDS) == TO_PROCESSES.ahead(LONG_TASK_SECONDS) == 0


def test_the_estimate_starts_at_the_first_sample_and_follows_slowly() -> None:
    estimate = smoothed(None, 0.5)
    assert estimate == 0.5
    assert smoothed(estimate, 1.5) == pytest.approx(0.6)
