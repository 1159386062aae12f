"""The buffers clients asked this worker to keep (KEEP markers), so that a large buffer that comes
with many tasks (an array inside a mapped callable) crosses the network once per worker.

Runs in the supervisor's loop thread; nothing here unpickles.

Each client session has its own buffers: one client cannot name another's. All of them together stay
within the worker's budget (``--cache-size``), the least recently used let go first; a task that names
a buffer no longer kept (HELD) is answered MISSING, and its client sends it again with the buffer.

A buffer is kept only if it hashes to the digest it came with (one BLAKE3 pass per kept buffer,
9 ms for 64 MiB on two cores): the client names a buffer when it submits and sends it later, from
the caller's own memory, so an array changed in place in between would otherwise be kept under its
old content's name and handed to later tasks that name that content.

Where the host has memfd (``_shm``), a kept buffer lives in one, and every task that comes with or
names it carries a MAPPED marker to its task process instead of the buffer: one copy per host.
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Optional, Sequence

from .._wire import _protocol as proto
from .._wire._serialize import digest as digest_of
from .._wire._shm import MemfdBuffer, shared_copy

logger = logging.getLogger("zmqexecutor")

# What a worker keeps by default, for all its clients together. More lets more (or bigger) buffers be
# sent once; it is memory the supervisor holds whether or not tasks come.
DEFAULT_KEEP_BYTES = 1 << 30


class KeptBuffers:
    """The buffers kept for every client session, by (client, digest), least recently used first."""

    def __init__(self, budget: int = DEFAULT_KEEP_BYTES) -> None:
        self.budget = budget
        self.buffers: collections.OrderedDict[tuple[bytes, bytes], Any] = collections.OrderedDict()
        self.size = 0
        self.memfds = 0
        # buffers kept, named again, not found, and refused (they did not hash to their name)
        self.counts = {"received": 0, "reused": 0, "missing": 0, "refused": 0}

    def resolve(self, client: bytes, frames: Sequence[Any]) -> Optional[Sequence[Any]]:
        """A task's frames with its markers taken out: each KEEP's buffer kept, each HELD replaced by
        the buffer kept (or a MAPPED marker naming its memfd); None if one of them is not kept (anymore)."""
        if len(frames) == 1 or not any(len(frame) == proto.MARK_SIZE for frame in frames[1:]):
            return frames
        resolved = [frames[0]]
        index = 1
        while index < len(frames):
            mark = proto.read_marker(frames[index])
            if mark is None:
                resolved.append(frames[index])
                index += 1
                continue
            kind, digest = mark
            if kind == proto.KEEP_MARK:
                if index + 1 >= len(frames):
                    raise proto.ProtocolError("a KEEP marker without its buffer")
                buffer = frames[index + 1]
                resolved.append(_handed(self.keep(client, digest, buffer), buffer))
                index += 2
                continue
            kept = self.buffers.get((client, digest))
            if kept is None:
                self.counts["missing"] += 1
                return None
            self.counts["reused"] += 1
            self.buffers.move_to_end((client, digest))
            resolved.append(_handed(kept, kept))
            index += 1
        return resolved

    def keep(self, client: bytes, digest: bytes, buffer: Any) -> Any:
        """Keep ``buffer`` as ``digest`` for ``client``; what is kept, or None."""
        size = len(buffer)
        if size > self.budget:
            return None
        known = self.buffers.get((client, digest))
        if known is not None:
            return known
        if digest_of((buffer,)) != digest:
            self.counts["refused"] += 1
            logger.warning("a buffer a client asked to keep changed between its submit and its send "
                           "(changed in place?): the task gets it as sent, and it is not kept")
            return None
        kept = shared_copy(digest, buffer, self.memfds) or buffer
        self.memfds += isinstance(kept, MemfdBuffer)
        self.buffers[(client, digest)] = kept
        self.size += size
        self.counts["received"] += 1
        while self.size > self.budget:
            _, dropped = self.buffers.popitem(last=False)
            self._let_go(dropped)
        return kept

    def _let_go(self, kept: Any) -> None:
        self.size -= len(kept)
        if isinstance(kept, MemfdBuffer):
            self.memfds -= 1
            kept.close()  # its memory goes once no task process maps it any more

    def forget(self, client: bytes) -> None:
        """The client's session ended: what it asked to keep goes."""
        for key in [key for key in self.buffers if key[0] == client]:
            self._let_go(self.buffers.pop(key))


def _handed(kept: Any, buffer: Any) -> Any:
    # What a task process gets: the marker of a buffer kept in a memfd, else the buffer itself.
    return kept.marker if isinstance(kept, MemfdBuffer) else buffer
