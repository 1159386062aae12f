"""Messages between a process and the task processes it feeds, over Unix stream sockets.

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

Between a supervisor and its task processes (``share_large``), a frame of SHARE_MIN bytes or more
travels instead as a sealed memfd whose descriptor rides along (SCM_RIGHTS, attached to the bytes
that start its message): its length has the SHARED bit set, its offset in the memfd follows the
lengths (u64 each), and the reader maps the pages the writer filled. The reader then needs no fresh
memory of its own, which costs more than the copy on this kind of machine (the kernel makes and
zeroes every page), and the bytes cross no socket. The embedded worker's processes talk to the
client's I/O thread without it: there one copy through the socket already beats the ZeroMQ floor.
"""

from __future__ import annotations

import array
import collections
import fcntl
import itertools
import mmap
import os
import pickle
import select
import socket
import struct
import sys
import time
from typing import Any, Optional

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

# Most memory a supervisor or task process keeps for reading large messages into again (BufferPool);
# more is read into fresh memory each time.
POOL_BYTES = 256 * 1024 * 1024

# Frames at least this big go as a shared memfd on links that allow it: below, a copy through the socket
# costs less than making, mapping and unmapping a memfd.
SHARE_MIN = 1 << 20

# Memfds per message (Linux passes at most 253 descriptors per call); further large frames of the same
# message go through the socket.
SHARE_PER_MESSAGE = 64

_SHARED = 1 << 63
_ANCILLARY = socket.CMSG_SPACE(SHARE_PER_MESSAGE * array.array("i").itemsize)
# A shared frame's memfd is sealed as it is passed: nobody can change or shrink it anymore, so a reader
# may map it and keep it (its own writes go to private copies of the pages it writes).
_SEALS = sum(getattr(fcntl, name, 0) for name in ("F_SEAL_SHRINK", "F_SEAL_GROW", "F_SEAL_WRITE", "F_SEAL_SEAL"))
_MUST_SEAL = getattr(fcntl, "F_SEAL_SHRINK", 0) | getattr(fcntl, "F_SEAL_WRITE", 0)

# pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst): in memory, swapped, a page of the file
_PRESENT, _SWAPPED, _FILE_PAGE = 1 << 63, 1 << 62, 1 << 61

_WAIT_READ = select.EPOLLIN
_WAIT_BOTH = select.EPOLLIN | select.EPOLLOUT


def _raw(frame: Any) -> memoryview:
    """``frame`` as a flat view of bytes, without a copy (a zmq.Frame, bytes, a PickleBuffer...)."""
    buffer = getattr(frame, "buffer", frame)  # zmq.Frame
    view = buffer.raw() if isinstance(buffer, pickle.PickleBuffer) else memoryview(buffer)
    if view.ndim != 1 or view.itemsize != 1:
        view = pickle.PickleBuffer(view).raw()
    return view


class _Descriptors:
    """Memfds to pass with the bytes that follow them in a Peer's ``out``; ours to close once sent."""

    __slots__ = ("fds",)

    def __init__(self, fds: list[int]) -> None:
        self.fds = fds

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _not_descriptors(item: Any) -> bool:
    return type(item) is not _Descriptors


class Peer:
    """One end of a connection, never blocking: what it cannot write now waits in ``out``."""

    __slots__ = ("sock", "fd", "owner", "closed", "out", "pending", "scratch", "body", "body_frames", "filled",
                 "poller", "watching_out", "buffers", "share", "received_fds", "marks", "mapped", "kept")

    def __init__(self, sock: socket.socket, poller: Optional["select.epoll"] = None,
                 buffers: Optional["BufferPool"] = None, share: bool = False) -> None:
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
        self.share = share  # large frames go and come as memfds
        self.received_fds: collections.deque[int] = collections.deque()  # not yet claimed by a frame
        self.marks = 0  # _Descriptors waiting in ``out``
        self.mapped: dict[int, memoryview] = {}  # the body being read: its frames that came as memfds
        # With ``keep_received()``: the memfds that came in and are still in use, so that a frame sent
        # back unchanged (a task that returns its argument, or part of it) goes back as the same memfd.
        self.kept: Optional[list[_Kept]] = None

    # Writing --------------------------------------------------------------------------------------

    def send(self, frames: list[Any]) -> bool:
        """Queue one message and write what the socket takes now; False when the peer is gone."""
        if self.closed:
            return False
        views = [frame if type(frame) is bytes else _raw(frame) for frame in frames]
        out = self.out
        if self.share and any(len(view) >= SHARE_MIN for view in views):
            self.queue_shared(views)
        else:
            out.append(struct.pack(f"<I{len(views)}Q", len(views), *map(len, views)))
            out.extend(view for view in views if len(view))
        self.flush()
        return not self.closed

    def keep_received(self) -> None:
        self.kept = []

    def queue_shared(self, views: list[Any]) -> None:
        lengths: list[int] = []
        offsets: list[int] = []
        fds: list[int] = []
        stream: list[Any] = []
        for view in views:
            size = len(view)
            shared = None
            if size >= SHARE_MIN and len(fds) < SHARE_PER_MESSAGE:
                shared = self.find_kept(view) if self.kept else None
                if shared is None:
                    fd = _share(view)
                    shared = None if fd is None else (fd, 0)
            if shared is None:
                lengths.append(size)
                if size:
                    stream.append(view)
            else:
                lengths.append(size | _SHARED)
                fds.append(shared[0])
                offsets.append(shared[1])
        if fds:
            self.out.append(_Descriptors(fds))
            self.marks += 1
        self.out.append(struct.pack(f"<I{len(lengths)}Q{len(offsets)}Q", len(lengths), *lengths, *offsets))
        self.out.extend(stream)

    def find_kept(self, view: Any) -> Optional[tuple[int, int]]:
        """A new descriptor of the memfd that ``view`` lies in, and its offset there, if its pages
        are still the memfd's own (none written since it was mapped); None otherwise."""
        assert self.kept is not None
        self.kept = [kept for kept in self.kept if kept.in_use()]
        address = _address(view)
        if address is not None:
            for kept in self.kept:
                if kept.start <= address and address + len(view) <= kept.end:
                    if _unwritten(address, len(view)):
                        return os.dup(kept.fd), kept.offset + address - kept.start
                    return None
        return None

    def flush(self) -> None:
        """Write what is queued until the socket would block."""
        out = self.out
        while out:
            ancillary: list[tuple[int, int, bytes]] = []
            if self.marks:
                # Descriptors go with the call that writes the first bytes of their message, so they
                # reach the reader no later than the lengths that claim them.
                rest: Any = iter(out)
                if type(out[0]) is _Descriptors:
                    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", out[0].fds).tobytes())]
                    rest = itertools.islice(out, 1, None)
                buffers = list(itertools.islice(itertools.takewhile(_not_descriptors, rest), IOV_MAX))
            else:
                buffers = list(itertools.islice(out, IOV_MAX))
            try:
                sent = self.sock.sendmsg(buffers, ancillary, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.close()
                return
            if ancillary:  # passed: the reader holds them now
                out.popleft().close()
                self.marks -= 1
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
            self.poller.modify(self.fd, _WAIT_BOTH if self.watching_out else _WAIT_READ)

    # Reading --------------------------------------------------------------------------------------

    def receive(self, reads: int = READS_PER_TURN) -> list[list[memoryview]]:
        """The messages that arrived whole, reading at most ``reads`` times; closes on end of stream."""
        messages: list[list[memoryview]] = []
        for _ in range(reads):
            try:
                if self.body is not None:
                    count = self.read(self.body[self.filled:])
                    if count:
                        self.filled += count
                        if self.filled == len(self.body):
                            messages.append(self.cut(self.body, self.body_frames, self.mapped))
                            self.body, self.mapped = None, {}
                        continue
                else:
                    count = self.read(self.scratch)
                    if count:
                        self.pending += self.scratch[:count]
                        self.parse(messages)
                        if count < READ_SIZE and self.body is None:
                            break  # the socket is empty now: spare the call that would say so
                        continue
            except (BlockingIOError, InterruptedError):
                break
            except (OSError, ValueError):
                pass
            self.close()
            break
        return messages

    def read(self, into: memoryview) -> int:
        if not self.share:
            return self.sock.recv_into(into)
        count, ancillary, flags, _ = self.sock.recvmsg_into([into], _ANCILLARY)
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
                self.received_fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            raise ValueError("descriptors were cut off")  # cannot happen within SHARE_PER_MESSAGE
        return count

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
            mapped: dict[int, memoryview] = {}
            if self.share and any(length & _SHARED for length in lengths):
                shared = [index for index, length in enumerate(lengths) if length & _SHARED]
                if len(pending) - start < head + 8 * len(shared):
                    break
                offsets = struct.unpack_from(f"<{len(shared)}Q", pending, start + head)
                head += 8 * len(shared)
                if self.kept:
                    self.kept = [kept for kept in self.kept if kept.in_use()]
                try:
                    for index, offset in zip(shared, offsets):
                        mapped[index] = _map(self.received_fds.popleft(), offset, lengths[index] & ~_SHARED,
                                             self.kept)
                        lengths[index] = 0
                except (IndexError, OSError, ValueError, OverflowError):
                    self.close()  # a corrupt stream, or descriptors that are not what they claim
                    return
            size = sum(lengths)
            if size >= _SHARED:
                self.close()  # a shared frame where none may be, or a corrupt stream
                return
            have = len(pending) - start - head
            if have >= size:
                body = bytes(pending[start + head:start + head + size])
                messages.append(self.cut(memoryview(body), lengths, mapped))
                start += head + size
                continue
            if size > READ_SIZE:
                # Read the rest straight into the message's own buffer, not through ``pending``.
                buffer = self.buffers.take(size) if self.buffers is not None else memoryview(_fresh_buffer(size))
                buffer[:have] = pending[start + head:]
                self.body, self.body_frames, self.filled, self.mapped = buffer, lengths, have, mapped
                start = len(pending)
            break
        del pending[:start]

    @staticmethod
    def cut(body: memoryview, lengths: list[int], mapped: dict[int, memoryview]) -> list[memoryview]:
        frames = []
        position = 0
        for length in lengths:
            frames.append(body[position:position + length])
            position += length
        for index, frame in mapped.items():
            frames[index] = frame
        return frames

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for item in self.out:
                if type(item) is _Descriptors:
                    item.close()
            self.out.clear()
            self.marks = 0
            while self.received_fds:
                os.close(self.received_fds.popleft())
            self.mapped = {}
            for kept in self.kept or ():
                kept.close()
            self.kept = None if self.kept is None else []
            if self.poller is not None:
                try:
                    self.poller.unregister(self.fd)
                except (OSError, ValueError):
                    pass
            self.sock.close()


class Listener:
    """The accepting side: a socket bound at ``path``, and a peer per process that connected.

    ``fileno()`` is an epoll descriptor over all of them, readable whenever one has something to say
    (or room for what waits to be written), so a caller's own poll needs this one descriptor.
    """

    def __init__(self, path: str, *, reuse_buffers: bool = False, share_large: bool = False) -> None:
        """``reuse_buffers``: large messages are read into memory used before, once nothing refers to
        it anymore; for a reader that only passes messages on (a supervisor), never for one whose
        messages become the user's objects. ``share_large``: large frames go both ways as memfds
        (the processes' Links must say so too)."""
        self.path = path
        self.share_large = share_large
        self.buffers = BufferPool() if reuse_buffers else None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(128)
        self.sock.setblocking(False)
        self.epoll = select.epoll()
        self.epoll.register(self.sock.fileno(), select.EPOLLIN)
        self.peers: dict[int, Peer] = {}
        self.uid = os.getuid()

    def fileno(self) -> int:
        return self.epoll.fileno()

    def receive(self) -> list[tuple[Peer, list[memoryview]]]:
        """Every message that arrived whole from any peer, without blocking; new peers are taken in."""
        received: list[tuple[Peer, list[memoryview]]] = []
        for fd, events in self.epoll.poll(0):
            if fd == self.sock.fileno():
                self.accept()
                continue
            peer = self.peers.get(fd)
            if peer is None:  # cannot happen; if it did, the descriptor would wake every poll
                try:
                    self.epoll.unregister(fd)
                except OSError:
                    pass
                continue
            if events & select.EPOLLOUT:
                peer.flush()
            if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                received.extend((peer, frames) for frames in peer.receive())
            if peer.closed:
                del self.peers[fd]
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
            # The folder already keeps other users out; a peer of another user is refused all the same.
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            if struct.unpack("3i", creds)[1] != self.uid:
                sock.close()
                continue
            _configure(sock)
            peer = Peer(sock, self.epoll, self.buffers, self.share_large)
            self.peers[peer.fd] = peer
            self.epoll.register(peer.fd, _WAIT_READ)

    def close(self) -> None:
        for peer in list(self.peers.values()):
            peer.close()
        self.peers.clear()
        self.epoll.close()
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


class Link:
    """The task process's end: a peer it waits on, and writes to until each message is out."""

    def __init__(self, path: str, give_up: Any, *, share_large: bool = False) -> None:
        """Connect to ``path``, retrying while nothing listens there yet, until ``give_up()`` says so;
        ``share_large`` as the Listener's."""
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
        self.peer = Peer(sock, buffers=BufferPool(), share=share_large)
        if share_large:
            self.peer.keep_received()
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
        if self.peer.kept:
            self.peer.kept = [kept for kept in self.peer.kept if kept.in_use()]
        return False

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


class BufferPool:
    """Memory for large messages, used again once the last view of it is gone.

    Fresh memory costs more than the copy into it on this kind of machine (the kernel makes and
    zeroes every page: 30 ms for 64 MiB here, against 8 ms to copy into memory already in use).
    The owner calls ``trim()`` when it is idle, so the memory is kept only while messages keep coming.
    """

    def __init__(self, limit: int = POOL_BYTES) -> None:
        self.limit = limit
        self.free_when_done: list[Any] = []

    def take(self, size: int) -> memoryview:
        best = None
        for buffer in self.free_when_done:
            # The pool's list, this loop and getrefcount's argument: nobody else holds it.
            if size <= len(buffer) <= 2 * size and sys.getrefcount(buffer) <= 3:
                if best is None or len(buffer) < len(best):
                    best = buffer
        if best is None:
            best = _fresh_buffer(size)
            held = sum(len(buffer) for buffer in self.free_when_done)
            if held + size > self.limit:  # make room by forgetting what nobody uses now
                self.free_when_done = [b for b in self.free_when_done if sys.getrefcount(b) > 3]
                held = sum(len(buffer) for buffer in self.free_when_done)
            if held + size <= self.limit:
                self.free_when_done.append(best)
        return memoryview(best)[:size]

    def trim(self) -> None:
        """Forget the memory nobody uses now."""
        if self.free_when_done:
            self.free_when_done = [b for b in self.free_when_done if sys.getrefcount(b) > 3]


def _fresh_buffer(size: int) -> Any:
    """Writable memory for a large message. Not a bytearray, which zero-fills it first (then the
    kernel zeroes each page again on first touch): an anonymous mapping with its pages made at once,
    which saved a fifth of a 64 MiB transfer's time here."""
    try:
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _POPULATE)
    except (OSError, ValueError):
        return bytearray(size)


_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


class _Kept:
    """A memfd that was passed to us, mapped at ``start``; its descriptor stays open while it is in use."""

    __slots__ = ("fd", "mapping", "offset", "start", "end")

    def __init__(self, fd: int, mapping: mmap.mmap, offset: int, start: int) -> None:
        self.fd, self.mapping, self.offset = fd, mapping, offset
        self.start, self.end = start, start + len(mapping) - offset

    def in_use(self) -> bool:
        # This object's reference, getrefcount's argument, and a view's if any is left.
        if sys.getrefcount(self.mapping) > 2:
            return True
        self.close()
        return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _share(view: Any) -> Optional[int]:
    """A sealed memfd holding ``view``'s bytes (None where there are no memfds: then the socket)."""
    try:
        fd = os.memfd_create("zmqexecutor-frame", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except (AttributeError, OSError):
        return None
    try:
        written = 0
        while written < len(view):
            written += os.write(fd, view[written:])
        # The reader maps it: a writer that could shrink it later would crash the reader (SIGBUS).
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except OSError:
        os.close(fd)
        return None
    return fd


def _map(fd: int, offset: int, length: int, kept: Optional[list[_Kept]] = None) -> memoryview:
    """``length`` bytes at ``offset`` of a sealed memfd that was passed to us, mapped privately (our
    writes stay ours); its descriptor is closed, or kept in ``kept`` while the mapping is in use."""
    keep = False
    try:
        if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & _MUST_SEAL != _MUST_SEAL or os.fstat(fd).st_size < offset + length:
            raise ValueError("a shared frame that is not a sealed memfd of its size")
        mapping = mmap.mmap(fd, offset + length, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        if kept is not None and (start := _address(memoryview(mapping))) is not None:
            kept.append(_Kept(fd, mapping, offset, start + offset))
            keep = True
    finally:
        if not keep:
            os.close(fd)
    return memoryview(mapping)[offset:offset + length]


def _address(view: Any) -> Optional[int]:
    """Where a writable buffer's bytes are in memory (None for a read-only one)."""
    import ctypes

    try:
        anchor = ctypes.c_char.from_buffer(view)
    except (TypeError, ValueError):
        return None
    address = ctypes.addressof(anchor)
    del anchor
    return address


def _unwritten(address: int, length: int) -> bool:
    """Whether no page of this private mapping of a file was written (copied) since it was mapped."""
    first, last = address // mmap.PAGESIZE, (address + length - 1) // mmap.PAGESIZE
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
            entries = array.array("Q", os.pread(pagemap.fileno(), 8 * (last - first + 1), 8 * first))
    except OSError:
        return False
    if len(entries) != last - first + 1:
        return False
    # A page not in memory (and not swapped) still reads from the file; one in memory must be the file's.
    return all(entry & _FILE_PAGE or not entry & (_PRESENT | _SWAPPED) for entry in entries)


def _configure(sock: socket.socket) -> None:
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        except OSError:
            pass
