"""The task side of a call: each distinct function pickle decoded once (``FunctionCache``), each
shared object decoded once (``shared_object``), and one client's ``__main__`` module as a task
process sees it (``MainNamespace``).

Runs in each task process's main thread.
"""

from __future__ import annotations

import collections
import functools
import pickle
import types
from typing import Any, Optional, Sequence

import cloudpickle

from ._serialize import FUNCTION_CACHE_SIZE, NotKept, digest

# The most bytes of buffers that decoded functions may hold (an array in a partial or a closure):
# more saves decoding them again after a while, but the memory stays taken in every task process.
FUNCTION_CACHE_BYTES = 1 << 30


class FunctionCache:
    """A task process's decoded functions, by their pickle, or by the key of a pickle with buffers
    (then the function holds them: at most FUNCTION_CACHE_BYTES of them are kept, the least recently
    used let go first)."""

    def __init__(self) -> None:
        self._functions: dict[bytes, Any] = {}
        self._with_buffers: collections.OrderedDict[bytes, tuple[Any, int]] = collections.OrderedDict()
        self._buffer_bytes = 0

    def load(self, reference: Any, buffers: Sequence[Any] = ()) -> Any:
        """The function a call names (``reference``: its pickle, or its key, pickle and buffer count)."""
        if isinstance(reference, bytes):
            fn = self._functions.get(reference)
            if fn is None:
                fn = pickle.loads(reference)
                if len(self._functions) >= FUNCTION_CACHE_SIZE:
                    self._functions.clear()
                self._functions[reference] = fn
            return fn
        key, blob, count = reference
        known = self._with_buffers.get(key)
        if known is not None:
            self._with_buffers.move_to_end(key)
            return known[0]
        if len(buffers) != count:
            raise NotKept("this process no longer has the function the call names")
        fn = pickle.loads(blob, buffers=buffers)
        size = sum(memoryview(b).nbytes for b in buffers)
        self._with_buffers[key] = (fn, size)
        self._buffer_bytes += size
        while self._buffer_bytes > FUNCTION_CACHE_BYTES or len(self._with_buffers) > FUNCTION_CACHE_SIZE:
            _, (_, dropped) = self._with_buffers.popitem(last=False)
            self._buffer_bytes -= dropped
        return fn


# The most bytes of pickles that shared objects (``ZMQExecutor.share``) decoded in a task process may
# stand for, and how many of them: past either, the least recently used is let go (and decoded again
# if a task names it once more).
SHARED_CACHE_BYTES = 1 << 30
SHARED_CACHE_SIZE = 64

_shared: collections.OrderedDict[bytes, tuple[Any, int]] = collections.OrderedDict()
_shared_bytes = 0


def shared_object(key: bytes, blob: Any) -> Any:
    """What a ``Shared`` handle unpickles to in a task process: its object, decoded once per process
    (``key``, a digest of ``blob``, names it)."""
    global _shared_bytes
    known = _shared.get(key)
    if known is not None:
        _shared.move_to_end(key)
        return known[0]
    value = pickle.loads(blob)
    size = memoryview(blob).nbytes
    _shared[key] = (value, size)
    _shared_bytes += size
    while len(_shared) > 1 and (_shared_bytes > SHARED_CACHE_BYTES or len(_shared) > SHARED_CACHE_SIZE):
        _, (_, dropped) = _shared.popitem(last=False)
        _shared_bytes -= dropped
    return value


class MainNamespace:
    """One client's ``__main__`` module as a task process sees it.

    cloudpickle sends a function from ``__main__`` by value with a private copy of the globals it uses,
    so an initializer that sets a global would set it in its own copy, never seen by the tasks. Here
    every such function (the submitted one, the initializer, and the ``__main__`` functions they call)
    runs in one namespace per client and process, as module globals do in ProcessPoolExecutor's
    workers. A name keeps what code in this process made of it (an initializer's connection, a dict a
    task filled, a counter) while the client's value stays as it was: every function that arrives
    brings its own copy of that value, equal in content to the last one, and that copy is ignored.
    When the client's value changes (rebound to other content, mutated, a function redefined), the new
    one replaces the process's.
    """

    def __init__(self) -> None:
        self.globals: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
        self.marks: dict[str, Optional[bytes]] = {}  # name -> a digest of the client's value as it came last
        self.adopted: dict[int, tuple[Any, Any]] = {}  # id(function as unpickled) -> (it, its copy here)

    def adopt(self, fn: Any) -> Any:
        """``fn`` as it runs here: a by-value function from ``__main__`` (or a partial of one, as
        ``map`` sends with a chunksize) bound to this namespace; anything else as it is."""
        partial = isinstance(fn, functools.partial)
        if not partial and not (isinstance(fn, types.FunctionType) and fn.__module__ == "__main__"):
            return fn
        known = self.adopted.get(id(fn))
        if known is not None and known[0] is fn:
            return known[1]
        if len(self.adopted) >= FUNCTION_CACHE_SIZE:
            self.adopted.clear()
        adopted: Any
        if partial:
            adopted = functools.partial(self.adopt(fn.func), *map(self.adopt, fn.args), **fn.keywords)
        else:
            adopted = self._adopt_function(fn)
        self.adopted[id(fn)] = (fn, adopted)
        return adopted

    def _adopt_function(self, fn: types.FunctionType) -> types.FunctionType:
        sent = fn.__globals__
        for name, value in sent.items():
            if name == "__builtins__":
                continue
            if isinstance(value, types.FunctionType) and value.__globals__ is sent:
                # A __main__ function it calls, in the same pickle: the client's code always wins.
                self.globals[name] = self._rebind(value)
                self.marks.pop(name, None)
                continue
            mark = _content_mark(value)
            if mark is not None and name in self.globals and self.marks.get(name) == mark:
                continue  # the client's value is as it was: what this process made of it stays
            self.globals[name] = value
            self.marks[name] = mark
        return self._rebind(fn)

    def _rebind(self, fn: types.FunctionType) -> types.FunctionType:
        copy = types.FunctionType(fn.__code__, self.globals, fn.__name__, fn.__defaults__, fn.__closure__)
        copy.__kwdefaults__ = fn.__kwdefaults__
        copy.__dict__.update(fn.__dict__)
        copy.__qualname__, copy.__module__, copy.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
        copy.__annotations__ = fn.__annotations__
        return copy


def _content_mark(value: Any) -> Optional[bytes]:
    """A digest of ``value``'s pickle (None if it has none): equal for the copies of one unchanged value
    that functions bring one after another."""
    buffers: list[pickle.PickleBuffer] = []
    try:
        head = cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append)
        return digest((head, *(buffer.raw() for buffer in buffers)))  # a big array: on several threads
    except Exception:
        return None
