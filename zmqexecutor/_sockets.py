"""Socket helpers shared by the client, the worker and the status query: options, draining, monitors."""

from __future__ import annotations

from typing import Any, Optional

import zmq
from zmq.utils.monitor import recv_monitor_message

# Most messages read from one socket per loop turn, so that one busy peer cannot starve the others.
DRAIN_LIMIT = 256


def unbounded(sock: zmq.Socket[Any], *, linger: Optional[int] = None) -> zmq.Socket[Any]:
    """No high-water marks: credit bounds what is queued, and a high-water mark would only drop or
    block silently."""
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    if linger is not None:
        sock.setsockopt(zmq.LINGER, linger)
    return sock


def drain(sock: zmq.Socket[Any], limit: int = DRAIN_LIMIT) -> list[list[Any]]:
    """The messages waiting on ``sock``, up to ``limit``, without blocking (frames uncopied)."""
    messages: list[list[Any]] = []
    while len(messages) < limit and _events(sock) & zmq.POLLIN:
        messages.append(sock.recv_multipart(zmq.NOBLOCK, copy=False))
    return messages


def readable(sock: zmq.Socket[Any]) -> bool:
    """Whether a message waits; checked after every send, since libzmq signals its descriptor only
    on a change it has not reported yet, and a send may take that change in silently."""
    return bool(_events(sock) & zmq.POLLIN)


def _events(sock: zmq.Socket[Any]) -> int:
    return int(sock.getsockopt(zmq.EVENTS))


def fileno(sock: zmq.Socket[Any]) -> int:
    """The descriptor that becomes readable when ``sock`` may have something to report."""
    return int(sock.getsockopt(zmq.FD))


def monitor_events(monitor: zmq.Socket[Any], flags: int = zmq.NOBLOCK) -> list[int]:
    """The libzmq socket-monitor events waiting on ``monitor`` (one, blocking, with ``flags=0``)."""
    events = []
    while True:
        try:
            events.append(int(recv_monitor_message(monitor, flags)["event"]))
        except zmq.Again:
            return events
        if not flags & zmq.NOBLOCK:
            return events
