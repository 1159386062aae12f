"""A connection's heartbeats, driven directly (no sockets): how often a worker is pinged, busy or
idle, and when one that stopped answering counts as lost."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from zmqexecutor._client._connection import IDLE_BEATS_PER_TIMEOUT, Connection
from zmqexecutor._client._scheduler import Task
from zmqexecutor._wire import _protocol as proto
from zmqexecutor._wire._protocol import Kind

TIMEOUT = 5.0
BEAT = TIMEOUT / 4


class Recorded(Connection):
    def __init__(self) -> None:
        super().__init__("tcp://worker:5555", hello=[b"hello"], heartbeat=BEAT, local=False, sent_to=set())
        self.state = self.READY
        self.pings: list[float] = []
        self.now = 0.0

    def send(self, frames: list[Any]) -> bool:
        assert proto.decode_header(frames[0]).kind == Kind.PING
        self.pings.append(self.now)
        return True


def beat_for(conn: Recorded, seconds: float, *, answer: bool) -> list[str]:
    lost = []
    for step in range(int(seconds / BEAT) + 1):
        conn.now = step * BEAT
        why = conn.beat(conn.now, TIMEOUT)
        if why is not None:
            lost.append(why)
        if answer:
            conn.heard_from()
    return lost


def test_a_busy_worker_is_pinged_every_beat_and_an_idle_one_once_per_timeout() -> None:
    idle = Recorded()
    assert beat_for(idle, 10.0, answer=True) == []
    assert IDLE_BEATS_PER_TIMEOUT == 1 and idle.pings == [0.0, TIMEOUT, 2 * TIMEOUT]
    busy = Recorded()
    busy.load.inflight[1] = Task(1, Future(), [b"call"], 4)
    assert beat_for(busy, 10.0, answer=True) == []
    assert len(busy.pings) == 9  # every beat


def test_an_idle_worker_that_stops_answering_is_lost_within_two_timeouts() -> None:
    hung = Recorded()
    lost = beat_for(hung, 2 * TIMEOUT + BEAT, answer=False)
    assert lost and lost[0] == f"no answer for {TIMEOUT:g} s"
    assert hung.pings[0] == 0.0
