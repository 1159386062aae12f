"""Durations counted into the buckets of a histogram, for Prometheus metrics: a task's run on a
worker (``--metrics-port``), a task's round trip on a client (``zmqexecutor.metrics``).

Runs in the thread that owns what is measured (the supervisor's loop, the client's I/O thread); a
metrics thread only copies the counts.
"""

from __future__ import annotations

import bisect


class Histogram:
    """Counts of durations (seconds) at or under each bound, and their sum."""

    # Upper bounds in seconds: from the tiniest tasks a relay sees to the ones time limits are for.
    BOUNDS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, float("inf"))

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * len(self.BOUNDS)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.sum += seconds
        self.counts[bisect.bisect_left(self.BOUNDS, seconds)] += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus's buckets: (upper bound as text, count at or under it)."""
        buckets, running = [], 0
        for bound, count in zip(self.BOUNDS, list(self.counts)):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else f"{bound:g}", running))
        return buckets
