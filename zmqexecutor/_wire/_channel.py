"""Messages between a process and the task processes it feeds, over Unix stream sockets.

Runs in a worker's supervisor loop, the client's I/O thread (or a user thread holding its lock), and each
task process's main thread.

Data flow::

    the client's I/O thread (embedded worker)            a task process (blocking, one per process)
    or a worker's supervisor (non-blocking)
      Listener: bound socket in a private folder  <---- connect (retried until it is bound)
        Peer per accepted process  <================>  Link wraps its Peer
          send(frames): queued, written as far as         send(frames): until written
          the socket takes, the rest when epoll says so   receive(): the messages that arrived whole
          receive(): the messages that arrived whole

Both ends are processes of this user on this host, so the link needs no ZeroMQ: a message crosses
the kernel once each way and wakes only the thread that waits for it, where a ZeroMQ hop also wakes a
libzmq I/O thread on either side (measured here, a bare echo driven through an executor thread:
about 0.9x ProcessPoolExecutor's round trip over ZeroMQ, 0.4x over a plain socket). ZeroMQ stays on
every link that crosses hosts or users.

A message is its frame count (u32), each frame's length (u64), then the frames back to back. Frames
are written from the caller's buffers (no copy into one blob) and read as views of one buffer per
message.
"""

from __future__ import annotations

import collections
import itertools
import os
import pickle
import select
import socket
import struct
import time
from typing import Any, Optional

from . import _features
from ._buffers import BufferPool, fresh_buffer
from ._readiness import ReadinessSet, readiness_set

_COUNT = struct.Struct("<I")

# The most frames one message may have; a larger count is a corrupt stream (a BATCH of the most
# tasks it may carry, each with an out-of-band buffer or two, stays far below).
MAX_FRAMES = 1 << 20

# Bytes asked of the kernel per read. Larger takes a burst of small replies in fewer calls; a
# message bigger than this is read straight into a buffer of its own size instead.
READ_SIZE = 256 * 1024

# Reads per peer per receive(), so that one busy process cannot starve the others or the loop.
READS_PER_TURN = 64

# Buffers per sendmsg call (Linux's IOV_MAX is 1024).
IOV_MAX = 1024

# Kernel buffers: big enough that a burst of tasks or replies goes in one call; a large payload
# still streams through them in pieces.
SOCKET_BUFFER = 4 * 1024 * 1024


# Where the system has it (Linux, FreeBSD): a peer that has gone away is an error, not a SIGPIPE.
# Python ignores SIGPIPE anyway, so elsewhere the send fails with EPIPE all the same.
_NO_SIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)


def _raw(frame: Any) -> memoryview:
    """``frame`` as a flat view of bytes, without a copy (a zmq.Frame, bytes, a PickleBuffer...)."""
    buffer = getattr(frame, "buffer", frame)  # zmq.Frame
    view = buffer.raw() if isinstance(buffer, pickle.PickleBuffer) else memoryview(buffer)
    if view.ndim != 1 or view.itemsize != 1:
        view = pickle.PickleBuffer(view).raw()
    return view


class Peer:
    """One end of a connection, never blocking: what it cannot write now waits in ``out``."""

    __slots__ = ("sock", "fd", "owner", "closed", "out", "pending", "scratch", "body", "body_frames", "filled",
                 "poller", "watching_out", "buffers")

    def __init__(self, sock: socket.socket, poller: Optional[ReadinessSet] = None,
                 buffers: Optional["BufferPool"] = None) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self.owner: Any = None  # whoever this peer turned out to be, for the side that accepted it
        self.closed = False
        self.out: collections.deque[Any] = collections.deque()  # bytes and flat views, to be written
        self.pending = bytearray()  # read, not yet a whole message
        # Reads land here first: a fresh buffer per read would be allocated with mmap and freed with
        # munmap every time (it is above malloc's threshold), three system calls more per read.
        self.scratch = memoryview(bytearray(READ_SIZE))
        self.body: Optional[memoryview] = None  # a large message being read into its own buffer
        self.body_frames: list[int] = []
        self.filled = 0
        self.poller = poller
        self.watching_out = False  # the poller also reports room to write: something waits in ``out``
        self.buffers = buffers  # where large messages are read into, if not fresh memory

    # Writing --------------------------------------------------------------------------------------

    def send(self, frames: list[Any]) -> bool:
        """Queue one message and write what the socket takes now; False when the peer is gone."""
        if self.closed:
            return False
        views = [frame if type(frame) is bytes else _raw(frame) for frame in frames]
        out = self.out
        out.append(struct.pack(f"<I{len(views)}Q", len(views), *map(len, views)))
        out.extend(view for view in views if len(view))
        self.flush()
        return not self.closed

    def flush(self) -> None:
        """Write what is queued until the socket would block."""
        out = self.out
        while out:
            try:
                sent = self.sock.sendmsg(list(itertools.islice(out, IOV_MAX)), [], _NO_SIGNAL)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.close()
                return
            while sent:
                head = out[0]
                if len(head) <= sent:
                    sent -= len(head)
                    out.popleft()
                else:
                    out[0] = memoryview(head)[sent:]
                    sent = 0
        self.watch()

    def watch(self) -> None:
        # One epoll_ctl per change of state, not per message.
        if self.poller is not None and not self.closed and self.watching_out != bool(self.out):
            self.watching_out = bool(self.out)
            self.poller.modify(self.fd, self.watching_out)

    # Reading --------------------------------------------------------------------------------------

    def receive(self, reads: int = READS_PER_TURN) -> list[list[memoryview]]:
        """The messages that arrived whole, reading at most ``reads`` times; closes on end of stream."""
        messages: list[list[memoryview]] = []
        for _ in range(reads):
            try:
                if self.body is not None:
                    count = self.sock.recv_into(self.body[self.filled:])
                    if count:
                        self.filled += count
                        if self.filled == len(self.body):
                            messages.append(self.cut(self.body, self.body_frames))
                            self.body = None
                        continue
                else:
                    count = self.sock.recv_into(self.scratch)
                    if count:
                        self.pending += self.scratch[:count]
                        self.parse(messages)
                        if count < READ_SIZE and self.body is None:
                            break  # the socket is empty now: spare the call that would say so
                        continue
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                pass
            self.close()
            break
        return messages

    def parse(self, messages: list[list[memoryview]]) -> None:
        pending = self.pending
        start = 0
        while len(pending) - start >= _COUNT.size:
            (count,) = _COUNT.unpack_from(pending, start)
            if count > MAX_FRAMES:
                self.close()
                return
            head = _COUNT.size + 8 * count
            if len(pending) - start < head:
                break
            lengths = list(struct.unpack_from(f"<{count}Q", pending, start + _COUNT.size))
            size = sum(lengths)
            have = len(pending) - start - head
            if have >= size:
                body = bytes(pending[start + head:start + head + size])
                messages.append(self.cut(memoryview(body), lengths))
                start += head + size
                continue
            if size > READ_SIZE:
                # Read the rest straight into the message's own buffer, not through ``pending``.
                buffer = self.buffers.take(size) if self.buffers is not None else memoryview(fresh_buffer(size))
                buffer[:have] = pending[start + head:]
                self.body, self.body_frames, self.filled = buffer, lengths, have
                start = len(pending)
            break
        del pending[:start]

    @staticmethod
    def cut(body: memoryview, lengths: list[int]) -> list[memoryview]:
        frames = []
        position = 0
        for length in lengths:
            frames.append(body[position:position + length])
            position += length
        return frames

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.out.clear()
            if self.poller is not None:
                try:
                    self.poller.unregister(self.fd)
                except (OSError, ValueError, KeyError):
                    pass
            self.sock.close()


class Listener:
    """The accepting side: a socket bound at ``path``, and a peer per process that connected.

    ``fileno()`` is one descriptor over all of them (``_readiness``), readable whenever one has
    something to say (or room for what waits to be written), so a caller's own poll needs this one.
    """

    def __init__(self, path: str, *, reuse_buffers: bool = False) -> None:
        """``reuse_buffers``: large messages are read into memory used before, once nothing refers to
        it anymore; for a reader that only passes messages on (a supervisor), never for one whose
        messages become the user's objects."""
        self.path = path
        self.buffers = BufferPool() if reuse_buffers else None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(128)
        self.sock.setblocking(False)
        self.readiness = readiness_set()
        self.readiness.register(self.sock.fileno())
        self.peers: dict[int, Peer] = {}
        self.uid = os.getuid()

    def fileno(self) -> int:
        return self.readiness.fileno()

    def receive(self) -> list[tuple[Peer, list[memoryview]]]:
        """Every message that arrived whole from any peer, without blocking; new peers are taken in."""
        received: list[tuple[Peer, list[memoryview]]] = []
        for fd, readable, writable in self.readiness.ready():
            if fd == self.sock.fileno():
                self.accept()
                continue
            peer = self.peers.get(fd)
            if peer is None:  # cannot happen; if it did, the descriptor would wake every poll
                try:
                    self.readiness.unregister(fd)
                except (OSError, KeyError):
                    pass
                continue
            if writable:
                peer.flush()
            if readable:
                received.extend((peer, frames) for frames in peer.receive())
            if peer.closed:
                del self.peers[fd]
        self.readiness.taken()
        return received

    def trim_buffers(self) -> None:
        if self.buffers is not None:
            self.buffers.trim()

    def read_to_end(self, peer: Peer) -> list[list[memoryview]]:
        """What a peer whose process has ended sent before it ended (its stream is finite)."""
        messages = []
        while not peer.closed:
            batch = peer.receive()
            if not batch and not peer.closed:
                break
            messages.extend(batch)
        if self.peers.get(peer.fd) is peer:  # its descriptor's number may be a newer peer's by now
            del self.peers[peer.fd]
        peer.close()
        return messages

    def accept(self) -> None:
        while True:
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            # The folder already keeps other users out; a peer of another user is refused all the same
            # where the system says who it is.
            uid = _features.peer_uid(sock)
            if uid is not None and uid != self.uid:
                sock.close()
                continue
            _configure(sock)
            peer = Peer(sock, self.readiness, self.buffers)
            self.peers[peer.fd] = peer
            self.readiness.register(peer.fd)

    def close(self) -> None:
        for peer in list(self.peers.values()):
            peer.close()
        self.peers.clear()
        self.readiness.close()
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


class Link:
    """The task process's end: a peer it waits on, and writes to until each message is out."""

    def __init__(self, path: str, give_up: Any) -> None:
        """Connect to ``path``, retrying while nothing listens there yet, until ``give_up()`` says so."""
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if give_up():
                    raise ConnectionError(f"nothing listens at {path}") from None
                time.sleep(0.01)
        _configure(sock)
        # A task's arguments are gone once its reply is written, unless the task kept them: then their
        # memory is not used again (the pool sees who still refers to it).
        self.peer = Peer(sock, buffers=BufferPool())
        self.poller = select.poll()
        self.poller.register(self.peer.fd, select.POLLIN)

    @property
    def closed(self) -> bool:
        return self.peer.closed

    def poll(self, timeout: float) -> bool:
        """Whether something arrived (or the peer went away) within ``timeout`` seconds; memory
        kept for large messages is let go after such a wait in vain."""
        if self.poller.poll(int(timeout * 1000)):
            return True
        assert self.peer.buffers is not None
        self.peer.buffers.trim()
        return False

    def look_for(self, seconds: float) -> bool:
        """As ``poll``, but awake all along: no wake-up to pay when something comes."""
        deadline = time.monotonic() + seconds
        poll = self.poller.poll
        while not poll(0):
            if time.monotonic() >= deadline:
                return False
        return True

    def receive(self) -> list[list[memoryview]]:
        return self.peer.receive()

    def send(self, frames: list[Any]) -> bool:
        """Write one message whole, waiting for room as needed; False when the peer is gone."""
        peer = self.peer
        peer.send(frames)
        while peer.out and not peer.closed:
            select.select([], [peer.fd], [])
            peer.flush()
        return not peer.closed

    def close(self) -> None:
        self.peer.close()


def _configure(sock: socket.socket) -> None:
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        except OSError:
            pass
