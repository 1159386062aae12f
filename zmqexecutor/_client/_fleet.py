"""The workers one executor reaches, as connections: a DEALER per bound endpoint (endpoints may be added
and removed while it runs) and the ROUTER that workers dial in to. It knows which sockets exist and
which of them the I/O thread must read; nothing about tasks, which are the scheduler's.

Runs in the client's I/O thread.

What it learns that matters to tasks, it returns to the engine: which workers were lost, and why.
"""

from __future__ import annotations

import logging
import selectors
import uuid
from typing import TYPE_CHECKING, Any, Optional, Protocol, Sequence, Union

import zmq

from .._wire._curve import ClientKeys
from .._wire._sockets import allow_descriptors_for, fileno, readable
from ._connection import Connection, Inbox, WorkerConnection
from ._dialin import DialInPort, DialledConnection
from ._scheduler import Scheduler

if TYPE_CHECKING:
    from ._direct import DirectLanes
    from ._settings import Settings

logger = logging.getLogger("zmqexecutor")


class Source(Protocol):
    """Anything the I/O thread reads: a bound worker's connection, the dial-in port, the embedded
    worker's lanes (_local.Embedded). The engine treats them all alike."""

    def take_input(self, inbox: Inbox) -> bool:
        """Hand what arrived to ``inbox``; True if more may be left unread."""
        ...


class Fleet:
    """Every worker connection of one executor, and the sockets the I/O thread watches for them."""

    def __init__(self, addresses: Sequence[str], settings: "Settings", context: zmq.Context[Any],
                 selector: selectors.BaseSelector, *, local: bool) -> None:
        self.addresses = list(addresses)  # the bound endpoints, as this thread knows them
        self.settings = settings
        self.context = context
        self.selector = selector
        self.local = local
        self.hello = settings.hello()
        self.client_id = f"zx-{uuid.uuid4().hex}".encode()
        self.connections: list[Connection] = []
        self.lanes_at: dict[str, "DirectLanes"] = {}  # the embedded worker's, by its endpoint
        self.port: Optional[DialInPort] = None  # where workers dial in, with listen=
        self.removing: set[WorkerConnection] = set()  # remove_endpoints: until their tasks are done
        self.unread: set[Source] = set()  # sockets with input (maybe) left to read
        self.unread_events: set[Union[WorkerConnection, DialInPort]] = set()  # monitors, likewise
        self.sent_to: set[Union[WorkerConnection, DialInPort]] = set()  # sockets that sent this turn

    def open(self) -> None:
        for address in self.addresses:
            self.connect(address, self.settings.keys)
        s = self.settings
        if s.listen is not None:
            self.port = port = DialInPort(self.context, s.listen, keys=s.listen_keys,
                                          max_message_size=s.max_message_size, hello=self.hello,
                                          heartbeat=s.heartbeat, sent_to=self.sent_to)
            self.watch(port)
            logger.info("listening for workers at %s", port.address)

    def watch(self, source: Union[WorkerConnection, DialInPort]) -> None:
        self.watch_socket(source, fileno(source.socket))
        self.selector.register(fileno(source.monitor), selectors.EVENT_READ, ("events", source))
        self.unread_events.add(source)  # a ZeroMQ descriptor signals only once it has been read

    def watch_socket(self, source: Source, fd: int) -> None:
        self.selector.register(fd, selectors.EVENT_READ, ("socket", source))

    def reach_directly(self, address: str, lanes: "DirectLanes", source: Source) -> None:
        """The worker at ``address`` (the embedded one, connected by ``open``) hands its tasks to its
        task processes through ``lanes``, read as ``source``."""
        self.lanes_at[address] = lanes
        self.watch_socket(source, lanes.fileno())

    def connect(self, address: str, keys: Optional[ClientKeys]) -> None:
        s = self.settings
        conn = WorkerConnection(address, self.context, hello=self.hello, heartbeat=s.heartbeat,
                                worker_timeout=s.worker_timeout, max_message_size=s.max_message_size,
                                keys=keys, client_id=self.client_id, local=self.local, sent_to=self.sent_to,
                                lanes=self.lanes_at.get(address))
        self.connections.append(conn)
        self.watch(conn)

    # What the waiting thread saw ------------------------------------------------------------------

    def look_at_sent(self) -> None:
        """A send may take a socket's news in silently (libzmq signals a change only once): look."""
        for source in self.sent_to:
            if readable(source.socket):
                self.unread.add(source)
        self.sent_to.clear()

    def take_ready(self, ready: list[tuple[selectors.SelectorKey, int]]) -> None:
        for key, _ in ready:
            if key.data is not None:
                which, source = key.data
                (self.unread if which == "socket" else self.unread_events).add(source)

    def has_input(self) -> bool:
        return bool(self.unread or self.unread_events)

    # Comings and goings ---------------------------------------------------------------------------

    def change(self, add: list[str], remove: list[str], keys: Optional[ClientKeys]) -> None:
        allow_descriptors_for(len(self.addresses) + len(add))
        for address in add:
            self.addresses.append(address)
            self.connect(address, keys)
        for conn in self.connections:
            if isinstance(conn, WorkerConnection) and conn.address in remove:
                logger.info("removing worker %s: no more tasks go there; %d in flight finish there",
                            conn.address, len(conn.load.inflight))
                conn.load.draining = True
                self.removing.add(conn)

    def retire_removed(self, scheduler: Scheduler) -> list[str]:
        """Close the removed connections that have nothing in flight anymore; their addresses."""
        retired = []
        for conn in list(self.removing):
            if conn.load.inflight:
                continue
            self.removing.discard(conn)
            scheduler.detach(conn.load, "removed")
            for sock in (conn.socket, conn.monitor):
                self.selector.unregister(fileno(sock))
            conn.close()  # its BYE put it in sent_to: taken out below
            for found in (self.unread, self.unread_events, self.sent_to):
                found.discard(conn)
            self.connections.remove(conn)
            self.addresses.remove(conn.address)
            retired.append(conn.address)
        return retired

    def joined(self, port: DialInPort, routing_id: bytes, frames: list[Any]) -> Optional[DialledConnection]:
        """A worker said JOIN: shake hands with it; returns its connection if its session was up
        (it reconnected, so its session is lost), else None."""
        conn, session_was_up = port.join(routing_id, frames)
        if conn not in self.connections:
            self.connections.append(conn)
        if session_was_up:
            return conn
        conn.say_hello()
        return None

    def tell_ready(self, frames: list[Any]) -> None:
        """Send ``frames`` to every worker with a session."""
        for conn in self.connections:
            if conn.ready:
                conn.send(frames)

    def departures(self) -> tuple[list[tuple[Connection, str]], bool]:
        """Read the monitors: the connections whose session is lost, and why; and whether a
        dialled-in worker's connection closed (then its ROUTER is to be asked again soon)."""
        lost: list[tuple[Connection, str]] = []
        someone_left = False
        for source in list(self.unread_events):
            self.unread_events.discard(source)
            found, left = source.departures()
            lost += found
            someone_left = someone_left or left
        return lost, someone_left

    def gone(self, conn: Connection) -> bool:
        """Whether ``conn`` is a dialled-in worker whose connection closed (then it is forgotten)."""
        if not conn.forget_if_gone():
            return False
        self.connections.remove(conn)
        return True

    def beats(self, now: float) -> list[tuple[Connection, str]]:
        """One heartbeat for every connection: those found lost, and why."""
        timeout = self.settings.worker_timeout
        return [(conn, why) for conn in list(self.connections) if (why := conn.beat(now, timeout)) is not None]

    def close(self) -> None:
        for conn in self.connections:
            conn.close()
        if self.port is not None:
            self.port.close()
