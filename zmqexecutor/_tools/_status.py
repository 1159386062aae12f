"""Asking workers how they are: the client side of ``zmqexecutor status`` and ``zmqexecutor ping``.

Runs in the process of the ``zmqexecutor`` command.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import zmq

from .._wire import _protocol as proto
from .._wire._protocol import Kind
from .._wire._curve import (
    HANDSHAKE_FAILURE_EVENTS,
    HANDSHAKE_FAILURES,
    ClientKeys,
    secure_client_socket,
)
from .._wire._sockets import monitor_events


# The version of the document ``zmqexecutor status --json`` prints: raised when a field changes
# meaning or goes away; new fields may appear without it.
STATUS_SCHEMA_VERSION = 1


def worker_document(endpoint: str, status: Optional[dict[str, Any]], seconds: float,
                    problem: Optional[str]) -> dict[str, Any]:
    """One worker in ``--json``'s document: what it answered, in the documented schema (the README's
    "zmqexecutor status --json"), or why it did not."""
    if status is None:
        return {"endpoint": endpoint, "state": "unreachable", "error": problem}
    state = "incompatible" if problem else "draining" if status.get("draining") else "ready"
    kept = {name[len("kept_"):]: value for name, value in status.items()
            if name.startswith("kept_") and name != "kept_bytes"}
    return {
        "endpoint": endpoint, "state": state, "error": problem or None,
        "round_trip_ms": round(seconds * 1000, 3),
        "versions": {name: status.get(name) for name in ("zmqexecutor", "python", "cloudpickle", "protocol")},
        "host": status.get("host"), "pid": status.get("pid"), "instance": status.get("instance"),
        "uptime_s": status.get("uptime"), "security": status.get("security"),
        "slots": status.get("slots"), "busy": status.get("busy"), "queued": status.get("queued"),
        "clients": status.get("clients"),
        "tasks": {"done": status.get("done"), "failed": status.get("failed"), "crashed": status.get("crashed"),
                  "timed_out": status.get("timed_out", 0), "killed_on_request": status.get("cancelled", 0)},
        "cache": {"kept_bytes": status.get("kept_bytes"), "budget_bytes": status.get("keep_bytes"), **kept},
        "resources": status.get("resources") or {}, "resources_in_use": status.get("resources_in_use") or {},
        "memory_bytes": status.get("memory_bytes"),
    }


def duration_text(seconds: object) -> str:
    """``3m12s``, ``2h05m09s``; ``?`` for what is not a number."""
    if not isinstance(seconds, (int, float)):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def query(endpoint: str, keys: Optional[ClientKeys], timeout: float, *, drain: bool = False
          ) -> tuple[Optional[dict[str, Any]], float, str]:
    """(status, round-trip seconds, problem): status is None and problem says why when no answer came.
    With ``drain``, the worker is asked to drain first (``zmqexecutor drain``)."""
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    monitor = sock.get_monitor_socket(HANDSHAKE_FAILURE_EVENTS)
    problem = f"no answer within {timeout:g} s"
    try:
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, proto.MAX_JSON_BYTES + proto.HEADER_SIZE)
        if keys is not None and keys.applies_to(endpoint):
            secure_client_socket(sock, keys, endpoint)
        sock.connect(endpoint)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        started = time.monotonic()
        deadline = started + timeout
        sent = False
        while time.monotonic() < deadline:
            if not sent:
                try:
                    sock.send_multipart(proto.encode_bare(Kind.DRAIN if drain else Kind.STATUS), zmq.NOBLOCK)
                    sent, started = True, time.monotonic()
                except zmq.Again:
                    pass  # not connected yet
            events = dict(poller.poll(10 if not sent else max(1, int((deadline - time.monotonic()) * 1000))))
            if monitor in events:
                problem = HANDSHAKE_FAILURES.get(monitor_events(monitor, 0)[0], problem)
            if sock in events:
                frames = sock.recv_multipart()
                try:
                    return proto.decode_status_reply(frames), time.monotonic() - started, ""
                except proto.ProtocolError as exc:
                    return None, 0.0, f"malformed answer: {exc}"
        return None, 0.0, problem
    finally:
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)
        context.term()
