"""Stand-ins for what the worker's bookkeeping talks to (processes, the client-facing socket), so that
the relay, the pool and the router run in tests without sockets or processes."""

from __future__ import annotations

import itertools
from typing import Any

from zmqexecutor._wire import _protocol as proto
from zmqexecutor._worker._taskprocess import COUNTERS

# Above Linux's largest pid_max (2**22): a signal sent to one reaches no real process.
_pids = itertools.count(5_000_000)
_sentinels = itertools.count(1_000_000)


class FakeProcess:
    def __init__(self, target: Any = None, args: Any = (), name: str = "", daemon: bool = False) -> None:
        self.pid = next(_pids)
        self.sentinel = next(_sentinels)
        self.exitcode: Any = None
        self.started = False

    def start(self) -> None:
        self.started = True

    def join(self, timeout: Any = None) -> None:
        pass

    def is_alive(self) -> bool:
        return self.exitcode is None


class FakeContext:
    """A multiprocessing context whose processes only record that they were started."""

    Process = FakeProcess

    @staticmethod
    def RawArray(typecode: str, size: int) -> list[int]:
        assert size == COUNTERS
        return [0] * size


class RecordingFront:
    """The supervisor's client-facing socket: records what would go to each client."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, list[Any]]] = []

    def send(self, client: bytes, frames: list[Any]) -> None:
        self.sent.append((client, [bytes(f) for f in frames]))

    def items(self, client: bytes) -> list[proto.Item]:
        """Everything sent to ``client`` so far, batches opened, in order; then forgotten."""
        found = []
        for to, frames in self.sent:
            if to == client:
                found += proto.split(proto.decode_header(frames[0], any_version=True), frames)
        self.sent = [(to, frames) for to, frames in self.sent if to != client]
        return found
