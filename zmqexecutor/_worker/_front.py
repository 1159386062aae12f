"""The worker's socket towards its clients: a bound ROUTER (``--bind``), or a DEALER that dials the
one client listening at ``--connect`` and introduces itself with JOIN on every new connection.

Runs in the supervisor's loop thread.
"""

from __future__ import annotations

import logging
import socket
from typing import Any, Optional

import zmq

from .._wire import _protocol as proto
from .._wire._curve import HANDSHAKE_FAILURE_EVENTS, DialKeys, Guard
from .._wire._sockets import (
    drain,
    listening_router,
    monitor_events,
    peer_link_options,
    unbounded,
)

logger = logging.getLogger("zmqexecutor.worker")

# A dialling worker retries this often while its client is not there, backing off to the maximum:
# a client that starts after its workers (the usual order with a launcher) is found within a second.
DIAL_RECONNECT_IVL_MS = 100
DIAL_RECONNECT_IVL_MAX_MS = 1000

# How long closing may spend flushing the last replies (DRAINING, the result of the last task a drain
# waited for) to the clients. Without it a reply queued just before the worker exits can be dropped
# unsent, and its task counts as lost. Bounded, so that a client that stopped reading cannot hold the
# exit; a bound ROUTER refuses messages to clients already gone, so only live ones are waited for.
CLOSE_LINGER_MS = 500


class BoundFront:
    """A ROUTER bound to the worker's endpoint; any number of clients connect to it."""

    monitor = None

    def __init__(self, context: zmq.Context[Any], bind: str, *, max_message_size: int,
                 guard: Optional[Guard]) -> None:
        self.socket = listening_router(context, max_message_size)
        if guard is not None:
            guard.secure(self.socket)
        self.socket.bind(bind)  # a ZMQError here is the caller's to report
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def messages(self) -> list[tuple[bytes, list[Any]]]:
        return [(frames[0].bytes, frames[1:]) for frames in drain(self.socket)]

    def send(self, client: bytes, frames: list[Any]) -> None:
        try:
            self.socket.send_multipart([client, *frames], copy=False)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            logger.debug("client %r is gone; dropped its message", client)

    def connection_events(self) -> None:
        pass

    def close(self) -> None:
        self.socket.close(linger=CLOSE_LINGER_MS)


class DialFront:
    """A DEALER that dials one client's ``listen`` address, reconnecting whenever the link breaks."""

    def __init__(self, context: zmq.Context[Any], address: str, *, join: dict[str, Any], max_message_size: int,
                 keys: Optional[DialKeys]) -> None:
        self.endpoint = address
        self.client = address.encode()  # the one session's key
        self.join = proto.encode_join(join)
        self.socket = unbounded(context.socket(zmq.DEALER), linger=CLOSE_LINGER_MS)
        # Stable across reconnections, so that the client's ROUTER hands the identity over to the
        # new connection and knows it is the same worker.
        self.socket.setsockopt(zmq.ROUTING_ID, str(join["instance"]).encode())
        self.socket.setsockopt(zmq.RECONNECT_IVL, DIAL_RECONNECT_IVL_MS)
        self.socket.setsockopt(zmq.RECONNECT_IVL_MAX, DIAL_RECONNECT_IVL_MAX_MS)
        peer_link_options(self.socket, max_message_size)
        if keys is not None:
            self.socket.curve_publickey = keys.public
            self.socket.curve_secretkey = keys.secret
            self.socket.curve_serverkey = keys.client
        self.monitor = self.socket.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILURE_EVENTS)
        self.connected = False
        self.refused: Optional[str] = None
        self.socket.connect(address)

    def messages(self) -> list[tuple[bytes, list[Any]]]:
        return [(self.client, frames) for frames in drain(self.socket)]

    def send(self, client: bytes, frames: list[Any]) -> None:
        # Without ZMQ_IMMEDIATE the message waits in the pipe while the link is down and goes out
        # when it is back; the client ignores what belongs to a session it has given up on.
        self.socket.send_multipart(frames, zmq.NOBLOCK, copy=False)

    def connection_events(self) -> None:
        for event in monitor_events(self.monitor):
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                logger.info("connected to the client at %s", self.endpoint)
                self.connected, self.refused = True, None
                self.send(self.client, self.join)
            elif event == zmq.EVENT_DISCONNECTED:
                if self.connected:
                    logger.info("lost the connection to the client at %s; dialling again", self.endpoint)
                self.connected = False
            elif event & HANDSHAKE_FAILURE_EVENTS:
                problem = _dialling_failure(event)
                if problem != self.refused:
                    logger.error("cannot join the client at %s: %s", self.endpoint, problem)
                self.refused = problem

    def close(self) -> None:
        self.socket.disable_monitor()
        self.monitor.close(linger=0)
        self.socket.close()


def _dialling_failure(event: int) -> str:
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return "the client refused this worker's key (it is not among the client's allowed worker keys)"
    return ("the secure handshake failed: the client's public key is not the pinned one (--keys, "
            "--client-key), or only one side uses keys")


def join_info(instance: str, slots: int, pid: int) -> dict[str, Any]:
    return dict(instance=instance, host=socket.gethostname(), pid=pid, slots=slots)
