"""Which large argument buffers a task names by digest, so that a worker may keep them, and the
handles of ``ZMQExecutor.share`` (``Shared``), which are such buffers from the start.

Runs in user threads (submit, map, share), in the client.

A buffer named by digest (``Task.keepable``) crosses to a worker once per session there (KEEP, then
HELD: see _connection._marked and the worker's _keep). Naming costs a BLAKE3 pass over the buffer
(9 ms for 64 MiB on two cores here), which a one-off argument must not pay: an argument buffer is
named only when its object comes again (the same array passed to task after task). Within one ``map``
an object that comes again is hashed once and taken to hold the same bytes for the rest of the map (as
ProcessPoolExecutor, which pickles later, in its own thread, also takes it); between maps, and for
every ``submit``, it is hashed again, so that an array changed in place is a new digest.
"""

from __future__ import annotations

import pickle
import weakref
from typing import Any, Generic, Optional, Sequence, TypeVar

import cloudpickle

from .._wire._namespace import shared_object
from .._wire._serialize import digest

# Argument buffers below this are sent with every task: a 35-byte marker and a kept entry on the worker
# are not worth it for a buffer that small, and hashing it each time would cost about what sending does.
KEEP_MIN_BYTES = 1 << 20

# How many argument buffers are remembered as seen, and how many digests one map keeps. A buffer not
# remembered is sent as it is, which is always right; more only helps programs that cycle through
# more big objects than this.
SEEN_SIZE = 256
MAP_DIGESTS = 16

# What a buffer that cannot be weakly referenced (bytes) is recognised by, beside its owner's id and
# size: its first and last bytes. A wrong "seen" costs only a digest, never a wrong object.
_SAMPLE = 32


def _sample(view: memoryview) -> bytes:
    return bytes(view[:_SAMPLE]) + bytes(view[-_SAMPLE:])


_T = TypeVar("_T")


class Shared(Generic[_T]):
    """An object pickled once by ``ZMQExecutor.share``: pass it to tasks in place of the object.

    A task that gets it as an argument (or inside one, or inside its callable) gets the object,
    decoded once per task process; its pickle crosses to each worker once. It is the object as it
    was when shared: share it again after changing it.
    """

    __slots__ = ("value", "key", "blob", "__weakref__")

    def __init__(self, value: _T) -> None:
        #: The object itself, as given to ``share``.
        self.value = value
        self.blob = cloudpickle.dumps(value, protocol=5)
        self.key = digest((self.blob,))

    @property
    def nbytes(self) -> int:
        """The size of the object's pickle: what each worker receives once."""
        return len(self.blob)

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return (shared_object, (self.key, pickle.PickleBuffer(self.blob)))

    def __repr__(self) -> str:
        return f"<Shared {type(self.value).__qualname__}, {self.nbytes} bytes pickled>"


class RepeatedBuffers:
    """One executor's memory of the large argument buffers it has sent, by their owning object."""

    def __init__(self) -> None:
        self._seen: dict[tuple[int, int], Any] = {}
        # id(pickle) -> (pickle, digest) of each live Shared handle: named from its first task on.
        self._shared: dict[int, tuple[bytes, bytes]] = {}

    def share(self, handle: Shared[Any]) -> None:
        """Name ``handle``'s pickle by its digest in every task, while the handle lives."""
        ident = id(handle.blob)
        self._shared[ident] = (handle.blob, handle.key)
        weakref.finalize(handle, self._shared.pop, ident, None)

    def keepable(self, frames: Sequence[Any], owners: Sequence[Any], first: int,
                 per_map: Optional["MapDigests"] = None) -> tuple[tuple[int, bytes], ...]:
        """(index, digest) for each of ``frames`` (argument buffers at ``first`` onwards, owned by
        ``owners``) that came before and is big enough to keep."""
        named = []
        for index, owner in enumerate(owners, first):
            shared = self._shared.get(id(owner))
            if shared is not None and shared[0] is owner:
                named.append((index, shared[1]))
                continue
            view = memoryview(frames[index]).cast("B")
            if view.nbytes < KEEP_MIN_BYTES:
                continue
            known = per_map.get(owner, view.nbytes) if per_map is not None else None
            if known is None:
                if not self._seen_before(owner, view):
                    continue
                known = digest((view,))
                if per_map is not None:
                    per_map.put(owner, view.nbytes, known)
            named.append((index, known))
        return tuple(named)

    def _seen_before(self, owner: Any, view: memoryview) -> bool:
        key = (id(owner), view.nbytes)
        mark = self._seen.get(key)
        if mark is not None and (mark() is owner if isinstance(mark, weakref.ref) else mark == _sample(view)):
            return True
        if len(self._seen) >= SEEN_SIZE:
            self._seen.clear()
        try:
            self._seen[key] = weakref.ref(owner)
        except TypeError:  # bytes and bytearray: no weak references
            self._seen[key] = _sample(view)
        return False


class MapDigests:
    """The digests of one ``map``'s repeated argument buffers; holds their owners, so an id stays theirs."""

    def __init__(self) -> None:
        self._digests: dict[tuple[int, int], tuple[Any, bytes]] = {}

    def get(self, owner: Any, size: int) -> Optional[bytes]:
        entry = self._digests.get((id(owner), size))
        return entry[1] if entry is not None and entry[0] is owner else None

    def put(self, owner: Any, size: int, known: bytes) -> None:
        if len(self._digests) >= MAP_DIGESTS:
            self._digests.clear()
        self._digests[(id(owner), size)] = (owner, known)
