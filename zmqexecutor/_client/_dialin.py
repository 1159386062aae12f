"""Workers that dial in: the client binds one ``listen`` address (a ROUTER) and every worker started
with ``zmqexecutor worker --connect`` connects to it, says JOIN, and is then a worker like any other.

Runs in the client's I/O thread.

Roles are reversed for CurveZMQ: the client is the server, and lets in only the worker keys it allows.
libzmq tells the ROUTER that *a* connection closed, not whose: so on every such event each dialled
worker is pinged, and the ones whose identity the ROUTER no longer knows (EHOSTUNREACH, thanks to
ZMQ_ROUTER_MANDATORY) are lost at once. Heartbeats catch whatever that misses.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Any, Optional

import zmq

from .._wire import _protocol as proto
from .._wire._protocol import Kind
from .._wire._curve import Guard, ListenKeys
from .._wire._sockets import DRAIN_LIMIT, drain, listening_router, monitor_events
from ._connection import Connection, Inbox

logger = logging.getLogger("zmqexecutor")


class DialInPort:
    """The bound ROUTER that workers dial, and the workers that did."""

    def __init__(self, context: zmq.Context[Any], listen: str, *, keys: Optional[ListenKeys],
                 max_message_size: int, hello: list[bytes], heartbeat: float, sent_to: set[Any]) -> None:
        self.hello, self.heartbeat, self.sent_to = hello, heartbeat, sent_to
        self.guard: Optional[Guard] = None
        self.socket = listening_router(context, max_message_size)
        if keys is not None:
            self.guard = Guard(context, keys.public, keys.secret, set(keys.allowed), peers="worker",
                               log="zmqexecutor.zap")
            self.guard.secure(self.socket)
        try:
            self.socket.bind(listen)
        except zmq.ZMQError as exc:
            self.close()
            hint = ""
            if exc.errno in (errno.ENODEV, errno.EADDRNOTAVAIL):
                hint = " (listen takes an address of this machine, or 0.0.0.0 for all of them)"
            reason = os.strerror(exc.errno) if exc.errno is not None else str(exc)
            raise OSError(exc.errno, f"cannot listen on {listen}: {reason}{hint}") from None
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.monitor = self.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.workers: dict[bytes, DialledConnection] = {}
        if self.guard is not None:
            self.guard.prove_strangers_are_rejected(self.address)

    def join(self, routing_id: bytes, frames: list[Any]) -> tuple["DialledConnection", bool]:
        """A worker said JOIN: its connection (new or known), and whether its session was up."""
        info = proto.decode_join(frames)
        conn = self.workers.get(routing_id)
        if conn is None:
            conn = self.workers[routing_id] = DialledConnection(self, routing_id, info)
            logger.info("worker %s dialled in with %s slot(s)", conn.address, info.get("slots"))
            return conn, False
        return conn, conn.ready

    def take_input(self, inbox: Inbox) -> bool:
        """Hand what the workers sent to ``inbox``; True if more may be left unread."""
        messages = drain(self.socket)
        for frames in messages:
            inbox.handle_dialled(self, frames)
        return len(messages) >= DRAIN_LIMIT

    def departures(self) -> tuple[list[tuple[Connection, str]], bool]:
        """Read the monitor: the workers whose connection closed, and whether any connection did
        (then the ROUTER is to be asked again soon: it may not have dropped the identity yet)."""
        if not monitor_events(self.monitor):
            return [], False
        # Whose connection closed, the ROUTER knows: ask it about each.
        return [(conn, "its connection closed") for conn in list(self.workers.values()) if not conn.still_there()], True

    def forget(self, conn: "DialledConnection") -> None:
        self.workers.pop(conn.routing_id, None)

    def close(self) -> None:
        monitor = getattr(self, "monitor", None)
        if monitor is not None:
            self.socket.disable_monitor()
            monitor.close(linger=0)
        self.socket.close(linger=0)
        if self.guard is not None:
            self.guard.stop()


class DialledConnection(Connection):
    """A worker that dialled in; reached through the port's ROUTER by its routing id."""

    def __init__(self, port: DialInPort, routing_id: bytes, info: dict[str, Any]) -> None:
        name = f"{info.get('host')}:{info.get('pid')} via {port.address}"
        super().__init__(name, hello=port.hello, heartbeat=port.heartbeat, local=False, sent_to=port.sent_to)
        self.port = port
        self.routing_id = routing_id
        self.gone = False  # the ROUTER no longer knows it: its connection closed

    def send(self, frames: list[Any]) -> bool:
        if self.gone:
            return False
        self.sent_to.add(self.port)
        try:
            self.port.socket.send_multipart([self.routing_id, *frames], zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            self.gone = True
            return False
        return True

    def may_hold_tasks(self) -> bool:
        return self.instance is not None  # tasks go only to a worker that shook hands

    def forget_if_gone(self) -> bool:
        if self.gone:
            self.port.forget(self)
        return self.gone

    def still_there(self) -> bool:
        """Ping it now (a connection closed somewhere); False when it is gone."""
        return self.send(proto.encode_bare(Kind.PING)) or not self.gone

    def beat(self, now: float, worker_timeout: float) -> Optional[str]:
        why = super().beat(now, worker_timeout)
        return "its connection closed" if self.gone else why
