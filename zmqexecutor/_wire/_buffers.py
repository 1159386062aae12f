"""Memory for large messages: fresh, with its pages made at once (by several threads for the largest),
and pooled, so that what a process reads into once it reads into again.

Runs wherever a Unix-socket peer reads (_channel): a worker's supervisor loop, the client's I/O thread,
a task process's main thread; the populating threads it starts live only for the one allocation.
"""

from __future__ import annotations

import mmap
import os
import sys
from typing import Any

from . import _features

# Most memory a supervisor or task process keeps for reading large messages into again (BufferPool);
# more is read into fresh memory each time.
POOL_BYTES = 256 * 1024 * 1024


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
            best = fresh_buffer(size)
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


def fresh_buffer(size: int) -> Any:
    """Writable memory for a large message. Not a bytearray, which zero-fills it first (then the
    kernel zeroes each page again on first touch): an anonymous mapping with its pages made at once,
    which saved a fifth of a 64 MiB transfer's time here. Making the pages is most of the cost, and
    the process that sends the message waits meanwhile, so a large one is made by several threads."""
    if size >= 2 * POPULATE_PART and _POPULATE_THREADS > 1:
        try:
            buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except (OSError, ValueError):
            return bytearray(size)
        if _populate_in_parallel(buffer, size):
            return buffer
        buffer.close()
    try:
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _POPULATE)
    except (OSError, ValueError):
        return bytearray(size)


_POPULATE = getattr(mmap, "MAP_POPULATE", 0) if _features.POPULATE else 0

# Fresh buffers of at least two of these are populated by up to _POPULATE_THREADS threads at once (a
# thread's start costs about 0.1 ms; 4 MiB of pages take 2 ms to make here).
POPULATE_PART = 4 * 1024 * 1024
_POPULATE_THREADS = min(4, len(os.sched_getaffinity(0))) if _features.POPULATE and _features.AFFINITY else 1
_MADV_POPULATE_WRITE = 23  # Linux 5.14; older kernels say EINVAL, and then MAP_POPULATE it is
_madvise: Any = None


def _populate_in_parallel(buffer: mmap.mmap, size: int) -> bool:
    """Make ``buffer``'s pages, a span per thread; False when that cannot be done here (MAP_POPULATE
    then), for good where this kernel or libc has no such madvise."""
    global _madvise, _POPULATE_THREADS
    import ctypes
    import errno
    import threading

    if _madvise is None:
        try:
            _madvise = ctypes.CDLL(None, use_errno=True).madvise  # ctypes lets go of the GIL during the call
        except (OSError, AttributeError):
            _POPULATE_THREADS = 1
            return False
        _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    anchor = ctypes.c_char.from_buffer(buffer)
    start = ctypes.addressof(anchor)
    del anchor
    parts = min(_POPULATE_THREADS, size // POPULATE_PART)
    step = size // parts & ~(mmap.PAGESIZE - 1)
    spans = [(start + i * step, step if i < parts - 1 else size - i * step) for i in range(parts)]
    errors = [0] * parts  # errno per span (ctypes keeps one per thread)

    def populate(index: int) -> None:
        if _madvise(spans[index][0], spans[index][1], _MADV_POPULATE_WRITE) != 0:
            errors[index] = ctypes.get_errno() or errno.EIO

    helpers = []
    for index in range(1, parts):
        helper = threading.Thread(target=populate, args=(index,), daemon=True)
        try:
            helper.start()
        except RuntimeError:  # no thread to spare: this one makes that span too
            populate(index)
            continue
        helpers.append(helper)
    populate(0)
    for helper in helpers:
        helper.join()
    if errno.EINVAL in errors:
        _POPULATE_THREADS = 1  # a kernel older than MADV_POPULATE_WRITE
    return not any(errors)
