"""One copy per host of each buffer a worker keeps: the supervisor (or, for the embedded worker, the
client) holds it in a memfd, and task processes map that memfd instead of receiving a copy with
every task.

Runs in the supervisor's loop thread (``MemfdBuffer``, for _worker._keep), the client's I/O thread
or a caller holding the engine's lock (``MemfdStore``, for the embedded worker's lanes), and in task
processes (``map_frames``).

A kept buffer goes to a task process as a MAPPED marker (digest, owner's pid, descriptor, size);
the process opens ``/proc/PID/fd/FD`` and maps it copy-on-write (``MAP_PRIVATE``): pages stay shared
with every other process until one writes to them, and a task that changes its array in place changes
its own copy, as it would with a copy of its own. The memfd is named by the digest, and the process
checks the name of what it opened, so a descriptor number the supervisor closed and used again for
something else is never taken for the buffer: the task is answered MISSING and its client sends the
buffer again. Without memfd_create and /proc (``_features.MEMFD``) kept buffers go as copies.
"""

from __future__ import annotations

import collections
import mmap
import os
import struct
from typing import Any, Optional, Sequence

from . import _features
from ._serialize import digest as digest_of

MAPPED_MARK = b"ZXM"
_MAPPED = struct.Struct("<3s32sIIQ")  # mark, digest, supervisor pid, descriptor, size
MAPPED_SIZE = _MAPPED.size
_NAME_PREFIX = "zx-"
_WRITE_CHUNK = 1 << 24

# Smaller kept buffers are copied to task processes with each task: a copy that small costs less
# than opening and mapping a memfd, and each memfd holds a descriptor of the supervisor's.
MEMFD_MIN_BYTES = 1 << 20
# The most memfds a supervisor holds at once (a 1 GiB budget of 1 MiB buffers would take 1,024
# descriptors, as many as a process may have by default); past it, buffers are kept as they are.
MAX_MEMFDS = 256


class Unmappable(Exception):
    """Raised when a task names a kept buffer this process cannot map (its supervisor let it go)."""


class MemfdBuffer:
    """A buffer copied into a memfd the supervisor owns; ``marker`` names it to the task processes."""

    __slots__ = ("fd", "size", "marker")

    def __init__(self, digest: bytes, buffer: Any) -> None:
        view = memoryview(buffer).cast("B")
        self.size = view.nbytes
        self.fd = os.memfd_create(_NAME_PREFIX + digest.hex(), os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, self.size)
            written = 0
            while written < self.size:
                written += os.pwrite(self.fd, view[written:written + _WRITE_CHUNK], written)
        except BaseException:
            os.close(self.fd)
            raise
        self.marker = _MAPPED.pack(MAPPED_MARK, digest, os.getpid(), self.fd, self.size)

    def __len__(self) -> int:
        return self.size

    def close(self) -> None:
        os.close(self.fd)


def shared_copy(digest: bytes, buffer: Any, held: int) -> Optional[MemfdBuffer]:
    """``buffer`` in a memfd, or None (kept as it is then) where this host has none, the buffer is
    small, or the supervisor holds ``held`` memfds already."""
    if not _features.MEMFD or memoryview(buffer).nbytes < MEMFD_MIN_BYTES or held >= MAX_MEMFDS:
        return None
    try:
        return MemfdBuffer(digest, buffer)
    except OSError:  # no memory left for it in tmpfs, or too many descriptors: keep the frame
        return None


class MemfdStore:
    """The embedded worker's kept buffers: memfds the client owns, by digest, within ``budget`` bytes
    (the least recently used let go first)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.size = 0
        self.buffers: collections.OrderedDict[bytes, MemfdBuffer] = collections.OrderedDict()

    def marker_for(self, digest: bytes, buffer: Any) -> Optional[bytes]:
        """The MAPPED marker of ``buffer`` (kept now if it was not), or None: send the buffer itself."""
        kept = self.buffers.get(digest)
        if kept is not None:
            self.buffers.move_to_end(digest)
            return kept.marker
        size = memoryview(buffer).nbytes
        if size > self.budget or not _features.MEMFD or size < MEMFD_MIN_BYTES:
            return None
        # Named at submit, read now from the caller's memory: changed in between, it is not this digest.
        if digest_of((buffer,)) != digest:
            return None
        made = shared_copy(digest, buffer, len(self.buffers))
        if made is None:
            return None
        self.buffers[digest] = made
        self.size += size
        while self.size > self.budget:
            _, dropped = self.buffers.popitem(last=False)
            self.size -= dropped.size
            dropped.close()
        return made.marker

    def close(self) -> None:
        while self.buffers:
            self.buffers.popitem()[1].close()
        self.size = 0


def map_frames(frames: Sequence[Any]) -> Sequence[Any]:
    """A task's call frames with each MAPPED marker replaced by the buffer it names, mapped."""
    if len(frames) == 1 or not any(len(frame) == MAPPED_SIZE for frame in frames[1:]):
        return frames
    return [frames[0], *(_mapped(frame) if len(frame) == MAPPED_SIZE else frame for frame in frames[1:])]


def _mapped(frame: Any) -> Any:
    data = bytes(frame)
    mark, digest, pid, fd, size = _MAPPED.unpack(data)
    if mark != MAPPED_MARK:
        return frame
    try:
        opened = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise Unmappable(f"kept buffer {digest.hex()[:12]} is gone: {exc}") from None
    try:
        # What was opened, not what the number named a moment ago: a memfd's link names it.
        if os.readlink(f"/proc/self/fd/{opened}") != f"/memfd:{_NAME_PREFIX}{digest.hex()} (deleted)" \
                or os.fstat(opened).st_size != size:
            raise Unmappable(f"kept buffer {digest.hex()[:12]} is gone")
        return memoryview(mmap.mmap(opened, size, access=mmap.ACCESS_COPY))
    finally:
        os.close(opened)
