"""Socket helpers shared by the client, the worker and the status query: options, draining, monitors.

Runs in whichever thread owns the socket at hand.
"""

from __future__ import annotations

import logging
import struct
from typing import Any, Optional

import zmq

logger = logging.getLogger("zmqexecutor")

# Most messages read from one socket per loop turn, so that one busy peer cannot starve the others.
DRAIN_LIMIT = 256

# On the sockets others connect to (a worker's endpoint, a client's listen address) and on a worker
# that dials: a peer that connects but does not finish the ZMTP/CurveZMQ handshake is dropped after
# HANDSHAKE_IVL_MS, and libzmq's heartbeats close a connection whose peer stopped answering (which
# frees what libzmq queued for it, or makes a dialling worker dial again). Four heartbeats per
# timeout: each costs libzmq's I/O thread, and a client listening for a thousand workers spent a
# percent of a core on them at ten per timeout.
HANDSHAKE_IVL_MS = 10_000
HEARTBEAT_IVL_MS = 5000
HEARTBEAT_TIMEOUT_MS = 20000

# Plain ints: pyzmq's constants are enum flags, and ``int & flag`` builds a new enum member each time.
_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)


# Descriptors a client spends per bound worker (its DEALER's mailbox, the TCP connection, the
# monitor's PAIR and its peer), and what it needs besides, whatever the number of workers.
DESCRIPTORS_PER_WORKER = 4
DESCRIPTORS_BESIDES = 256


def roomy_context() -> zmq.Context[Any]:
    """A context for as many sockets as libzmq allows: its default, 1,023, let a client reach about
    400 bound workers (two sockets each). A slot costs libzmq a pointer."""
    context: zmq.Context[Any] = zmq.Context()
    context.set(zmq.MAX_SOCKETS, context.get(zmq.SOCKET_LIMIT))
    return context


def allow_descriptors_for(workers: int) -> None:
    """Raise this process's soft limit on open descriptors (never above the hard one) if ``workers``
    bound workers would need more: 1,024, a common default, is 250 of them."""
    try:
        import resource
    except ImportError:  # Windows: no such limit to raise
        return
    wanted = DESCRIPTORS_PER_WORKER * workers + DESCRIPTORS_BESIDES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if raised > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
        logger.info("raised the limit on open files from %d to %d for %d workers", soft, raised, workers)


def unbounded(sock: zmq.Socket[Any], *, linger: Optional[int] = None) -> zmq.Socket[Any]:
    """No high-water marks: credit bounds what is queued, and a high-water mark would only drop or
    block silently."""
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    if linger is not None:
        sock.setsockopt(zmq.LINGER, linger)
    return sock


def peer_link_options(sock: zmq.Socket[Any], max_message_size: int) -> zmq.Socket[Any]:
    """Handshake and heartbeat intervals, and the largest frame a peer may send (libzmq drops a
    peer that sends more, before anything reads it)."""
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_size)
    return sock


def listening_router(context: zmq.Context[Any], max_message_size: int) -> zmq.Socket[Any]:
    """A ROUTER for others to connect to: a send to a peer that is gone fails (EHOSTUNREACH) rather
    than vanishing, and a peer that reconnects takes its identity over from its old connection."""
    sock = unbounded(context.socket(zmq.ROUTER), linger=0)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    return peer_link_options(sock, max_message_size)


def drain(sock: zmq.Socket[Any], limit: int = DRAIN_LIMIT) -> list[list[Any]]:
    """The messages waiting on ``sock``, up to ``limit``, without blocking (frames uncopied)."""
    messages: list[list[Any]] = []
    while len(messages) < limit and _events(sock) & _POLLIN:
        messages.append(sock.recv_multipart(_NOBLOCK, copy=False))
    return messages


def readable(sock: zmq.Socket[Any]) -> bool:
    """Whether a message waits; checked after every send, since libzmq signals its descriptor only
    on a change it has not reported yet, and a send may take that change in silently."""
    return bool(_events(sock) & _POLLIN)


def _events(sock: zmq.Socket[Any]) -> int:
    return sock.getsockopt(_EVENTS)  # type: ignore[return-value]


def fileno(sock: zmq.Socket[Any]) -> int:
    """The descriptor that becomes readable when ``sock`` may have something to report."""
    return int(sock.getsockopt(zmq.FD))


def monitor_events(monitor: zmq.Socket[Any], flags: int = zmq.NOBLOCK) -> list[int]:
    """The libzmq socket-monitor events waiting on ``monitor`` (one, blocking, with ``flags=0``)."""
    events = []
    while True:
        try:
            # The event's first frame: its id (u16) and value (u32). Read here, not with
            # zmq.utils.monitor, which imports asyncio: a fifth of `import zmqexecutor`.
            events.append(struct.unpack_from("=H", monitor.recv_multipart(flags)[0])[0])
        except zmq.Again:
            return events
        if not flags & zmq.NOBLOCK:
            return events
