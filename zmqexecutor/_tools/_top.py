"""``zmqexecutor top ENDPOINT...``: the workers, live, in the terminal (with the ``rich`` library:
``pip install 'zmqexecutor[top]'``), redrawn in place every ``--interval`` seconds until Ctrl-C.

Runs in the process of the ``zmqexecutor`` command: its main thread asks each worker for its status
(as ``zmqexecutor status`` does) and draws; rich's own thread refreshes the screen.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from .._wire._curve import ClientKeys
from ._status import duration_text, query

# Columns: header, and how a worker's row fills it.
COLUMNS = ("endpoint", "state", "slots", "busy", "queued", "tasks/s", "done", "failed", "crashed", "clients",
           "memory", "up")


# The widest an endpoint is shown before it folds onto two lines.
ENDPOINT_WIDTH = 40


class Sample:
    """What one worker answered last, and when: tasks/s is the change in ``done`` between two."""

    __slots__ = ("status", "at", "rate")

    def __init__(self) -> None:
        self.status: Optional[dict[str, Any]] = None
        self.at = 0.0
        self.rate: Optional[float] = None

    def take(self, status: Optional[dict[str, Any]], now: float) -> None:
        if status is not None and self.status is not None and now > self.at:
            finished = sum(status.get(key, 0) - self.status.get(key, 0) for key in ("done", "failed", "crashed"))
            self.rate = max(0.0, finished / (now - self.at))
        elif status is None:
            self.rate = None
        self.status, self.at = status, now


def row(endpoint: str, sample: Sample, problem: str) -> list[str]:
    status = sample.status
    if status is None:
        return [endpoint, f"unreachable: {problem}"] + [""] * (len(COLUMNS) - 2)
    memory = status.get("memory_bytes")
    return [
        endpoint, "draining" if status.get("draining") else "ready", str(status.get("slots")),
        str(status.get("busy")), str(status.get("queued")),
        "" if sample.rate is None else f"{sample.rate:.1f}", str(status.get("done")), str(status.get("failed")),
        str(status.get("crashed")), str(status.get("clients")),
        "?" if not isinstance(memory, int) else f"{memory / 2**20:.0f} MiB", duration_text(status.get("uptime")),
    ]


def run(endpoints: list[str], keys: Optional[ClientKeys], interval: float, timeout: float) -> int:
    from rich.live import Live
    from rich.table import Table

    samples = {endpoint: Sample() for endpoint in endpoints}
    problems = {endpoint: "" for endpoint in endpoints}

    def table() -> Table:
        shown = Table(title=f"zmqexecutor top — {len(endpoints)} worker(s), every {interval:g} s; Ctrl-C quits")
        widest = min(ENDPOINT_WIDTH, max(map(len, endpoints)))
        for name in COLUMNS:
            # The endpoint keeps its width (up to ENDPOINT_WIDTH, then folds); a narrow terminal squeezes
            # the rest.
            shown.add_column(name, justify="left" if name in ("endpoint", "state") else "right",
                             overflow="fold", min_width=widest if name == "endpoint" else None)
        for endpoint in endpoints:
            shown.add_row(*row(endpoint, samples[endpoint], problems[endpoint]))
        return shown

    try:
        with Live(table(), auto_refresh=False, screen=False) as live:
            while True:
                for endpoint in endpoints:
                    status, _, problems[endpoint] = query(endpoint, keys, timeout)
                    samples[endpoint].take(status, time.monotonic())
                live.update(table(), refresh=True)
                time.sleep(interval)
    except KeyboardInterrupt:
        return 0
