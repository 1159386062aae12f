"""How far ahead to send tasks, from how long they take: one rule for both hops that queue work.

Runs wherever tasks are handed out: the client's I/O thread (to workers, _client._scheduler) and the
supervisor's loop thread (to task processes, _worker._relay).

A slot that finishes a task should find its next one already waiting, so tasks go ahead of need; but
a task sent ahead can no longer be cancelled, nor run by a slot elsewhere that frees up first. So the
count ahead follows an estimate of each task's duration: enough to keep a slot busy for a horizon
that covers the hop's round trip, and none at all for long tasks, where a round trip is cheap.
"""

from __future__ import annotations

from typing import Optional

# How fast the estimate of a task's duration follows new samples (an exponential average): faster
# follows a change of workload sooner, slower is less swayed by one odd task.
SERVICE_SMOOTHING = 0.1

# Tasks that take this long get no company sent ahead: a round trip is then a small price, while a
# task stuck behind a long one could leave another slot idle for that long.
LONG_TASK_SECONDS = 0.05

# Sent ahead per slot at most. The time horizon is what limits real tasks; the count binds only for
# the tiniest (no-ops), where each message costs most: it wakes a peer that ran dry, which on a VM
# costs its sender tens of µs.
MAX_AHEAD_PER_SLOT = 256


class Pace:
    """One hop's rule: how many tasks go ahead per slot, given the estimated duration of a task."""

    __slots__ = ("horizon", "unknown", "at_least")

    def __init__(self, horizon: float, *, unknown: int, at_least: int) -> None:
        self.horizon = horizon  # seconds of work to keep queued per slot
        self.unknown = unknown  # ahead while nothing is known of the tasks yet
        self.at_least = at_least  # ahead for any task shorter than LONG_TASK_SECONDS

    def ahead(self, service: Optional[float], horizon: float = 0.0) -> int:
        """``horizon``: seconds of work to keep queued, when more than the hop's own (a busy client
        that returns to a worker only that much later)."""
        if service is None:
            return self.unknown
        if service >= LONG_TASK_SECONDS:
            return 0
        return max(self.at_least, min(MAX_AHEAD_PER_SLOT, int(max(self.horizon, horizon) / max(service, 1e-9))))


# Client to worker: the horizon covers a network round trip and fills batches. While nothing is
# known, one ahead per slot (ProcessPoolExecutor's habit, which hides one round trip); at least one for
# short tasks, which always cost more than the hop saves.
TO_WORKERS = Pace(0.005, unknown=1, at_least=1)

# Supervisor to task process: a local hop, so a shorter horizon, and nothing ahead until the tasks are
# known to be short: a long task never holds back one that another process could start now.
TO_PROCESSES = Pace(0.002, unknown=0, at_least=0)


def smoothed(estimate: Optional[float], sample: float) -> float:
    """The estimate of a task's duration after one more ``sample`` (seconds)."""
    return sample if estimate is None else estimate + SERVICE_SMOOTHING * (sample - estimate)
