"""Pickling calls and results: cloudpickle where it is needed, the C pickler where it is not.

Runs in user threads (pickling calls), the client's I/O thread (results), and task processes (decoding
calls, pickling results; their ``__main__`` is _namespace's).

A call travels as ``[pickle of (function, args, kwargs), *the arguments' buffers, *the function's
buffers]``. The function is pickled on its own, so that both sides can cache it; large buffers inside
it (an array in a ``functools.partial`` or a closure) travel out-of-band like the arguments', and such a
function goes as ``(key, pickle, buffer count)``, ``key`` a digest of its pickle and buffers:

- the client keeps a function's pickle while that provably cannot change what runs (``CallEncoder``):
  always for functions, classes and builtins pickled by reference (importable); for functions
  pickled by value (``__main__``, lambdas, closures) only while the code and every value it captures
  (the globals it names, its closure, defaults and attributes) are the very same immutable objects, so
  that a new definition or a rebound global sends new code;
- ``map`` pickles its callable once for all its tasks (``FunctionPickle``);
- a task process decodes each distinct function pickle (or key) once (``_namespace.FunctionCache``).

Arguments and results made only of plain values (None, numbers, short strings and bytes, small flat
tuples and lists of them) hold no reference to any code, so the C pickler serializes them; anything
else goes through cloudpickle with pickle protocol 5, large buffers as frames of their own.
"""

from __future__ import annotations

import io
import os
import pickle
import threading
import types
import weakref
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence, Union

import blake3
import cloudpickle

from ._errors import ProtocolError
from ._tracebacks import remember_code

# Buffers below this size are pickled in-band: a frame of its own costs more than copying a small
# buffer, while above it the saved memcpy dominates.
OOB_MIN_BYTES = 64 * 1024

# Pickles of functions kept per executor and decoded functions kept per task process. Past this the
# cache starts over: a program that makes new functions without end must not grow memory without end.
FUNCTION_CACHE_SIZE = 256

# How deep a by-value function may nest other by-value functions and still be cached; deeper ones are
# pickled every time, which is always correct.
FINGERPRINT_DEPTH = 4

_ATOMS = (type(None), bool, int, float, complex, str, bytes)
# Containers of atoms that the C pickler handles, checked only up to this many items.
_PLAIN_ITEMS = 32


# --- frames ---------------------------------------------------------------------------------------


def _as_buffer(frame: Any) -> Any:
    buffer = getattr(frame, "buffer", None)  # a zmq.Frame
    return frame if buffer is None else buffer


class _LargeBytes:
    """A top-level ``bytes`` argument or result, sent as its own frame instead of inside the pickle."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return (bytes, (pickle.PickleBuffer(self.data),))


def _rebuild_memoryview(buf: memoryview, fmt: str, shape: tuple[int, ...]) -> memoryview:
    flat: Any = memoryview(buf).cast("B")
    view: memoryview = flat.cast(fmt, shape)
    return view


class _LargeView:
    __slots__ = ("view",)

    def __init__(self, view: memoryview) -> None:
        self.view = view

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        view: Any = self.view
        if not view.c_contiguous:
            view = memoryview(view.tobytes()).cast("B").cast(view.format, view.shape)
        return (_rebuild_memoryview, (pickle.PickleBuffer(view), view.format, view.shape))


def _wrap(obj: Any) -> Any:
    # Pickle's C fast path serializes bytes in-band, and memoryviews not at all: give the top-level
    # ones a reducer that sends their memory as a frame of its own.
    if type(obj) is bytes and len(obj) >= OOB_MIN_BYTES:
        return _LargeBytes(obj)
    if type(obj) is memoryview:
        return _LargeView(obj)
    return obj


def _is_atom(obj: Any) -> bool:
    return type(obj) in _ATOMS and (type(obj) not in (str, bytes) or len(obj) < OOB_MIN_BYTES)


def is_plain(obj: Any) -> bool:
    """True for values the C pickler serializes with no reference to any code."""
    if _is_atom(obj):
        return True
    if type(obj) in (tuple, list) and len(obj) <= _PLAIN_ITEMS:
        return all(_is_atom(item) for item in obj)
    return False


def dumps(obj: Any, owners: Optional[list[Any]] = None) -> list[Any]:
    """Pickle ``obj`` into frames: the pickle, then each large buffer uncopied (and its exporting
    object appended to ``owners``)."""
    buffers: list[Any] = []

    def keep_out_of_band(buf: pickle.PickleBuffer) -> bool:
        try:
            raw = buf.raw()
        except BufferError:
            return True
        if raw.nbytes < OOB_MIN_BYTES:
            return True
        buffers.append(raw)
        if owners is not None:
            owners.append(raw.obj)
        return False

    stream = io.BytesIO()
    cloudpickle.Pickler(stream, protocol=5, buffer_callback=keep_out_of_band).dump(obj)
    # A small pickle is cheaper kept as bytes (copied once) than as a view pinning its BytesIO.
    head = stream.getvalue() if stream.tell() < OOB_MIN_BYTES else stream.getbuffer()
    return [head, *buffers]


def loads(frames: Sequence[Any]) -> Any:
    if not frames:
        raise ProtocolError("no pickle frame")
    return pickle.loads(_as_buffer(frames[0]), buffers=[_as_buffer(f) for f in frames[1:]])


def digest(parts: Iterable[Any]) -> bytes:
    """A digest of ``parts`` (buffers) together: what names a buffer or a function pickle with buffers.
    BLAKE3 (the ``blake3`` package): 16 ms for 64 MiB on one core here, where SHA-256, the fastest
    cryptographic hash of the standard library, takes 38 ms and blake2b 101 ms. A part of two pieces or
    more is hashed piece by piece on several threads (the package lets go of the GIL), and the digests
    of its pieces stand for it (9 ms for 64 MiB on 2 cores)."""
    hashed = blake3.blake3()
    for part in parts:
        view = memoryview(part).cast("B")
        hashed.update(len(view).to_bytes(8, "little"))
        hashed.update(view if len(view) < 2 * DIGEST_PIECE else b"".join(_piece_digests(view)))
    return hashed.digest()


# Large buffers are hashed in pieces of this size, each on one of at most DIGEST_THREADS threads. It
# fixes what the digest is (both sides must agree), not only how fast: changing it renames every buffer.
DIGEST_PIECE = 4 << 20
DIGEST_THREADS = min(8, os.cpu_count() or 1)


def _piece_digests(view: memoryview) -> list[bytes]:
    pieces = [view[start:start + DIGEST_PIECE] for start in range(0, len(view), DIGEST_PIECE)]
    found = [b""] * len(pieces)
    threads = min(DIGEST_THREADS, len(pieces))

    def hash_every(first: int) -> None:
        for index in range(first, len(pieces), threads):
            found[index] = blake3.blake3(pieces[index]).digest()

    # Threads of our own, started here, not the package's (max_threads) nor a pool's: neither would
    # survive a fork of the client, and the package's would wait for ever in the child.
    helpers = [threading.Thread(target=hash_every, args=(first,), daemon=True) for first in range(1, threads)]
    for helper in helpers:
        helper.start()
    hash_every(0)
    for helper in helpers:
        helper.join()
    return found


# --- calls ----------------------------------------------------------------------------------------


class FunctionPickle(NamedTuple):
    """A function as it travels: its pickle, and the large buffers inside it (which need the key)."""

    blob: bytes
    buffers: tuple[Any, ...] = ()
    key: bytes = b""  # with buffers: a digest of the pickle and the buffers
    digests: tuple[bytes, ...] = ()  # one per buffer: what names it where a worker keeps it

    @property
    def reference(self) -> Union[bytes, tuple[bytes, bytes, int]]:
        """What the call pickle holds for the function."""
        return self.blob if not self.buffers else (self.key, self.blob, len(self.buffers))


def pickle_function(fn: Any) -> FunctionPickle:
    """``fn`` pickled by value or reference, its large buffers out-of-band."""
    frames = dumps(fn)
    blob = bytes(frames[0])
    if len(frames) == 1:
        return FunctionPickle(blob)
    buffers = tuple(frames[1:])
    digests = tuple(digest((buffer,)) for buffer in buffers)
    return FunctionPickle(blob, buffers, digest((blob, *digests)), digests)


class CallEncoder:
    """Pickles calls for one executor, each function once while that cannot change what runs."""

    def __init__(self) -> None:
        # id(fn) -> (fn, fingerprint, pickle); holding fn keeps its id from being reused.
        self._cache: dict[int, tuple[Any, Any, FunctionPickle]] = {}
        self._by_value_modules: frozenset[str] = frozenset()

    def encode(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
               time_limit: Optional[float] = None, function: Optional[FunctionPickle] = None,
               owners: Optional[list[Any]] = None) -> list[Any]:
        """The call's frames; ``time_limit``, seconds it may run, travels with it (it is the task
        process that says when its task started). ``function``: ``fn`` pickled already (by ``map``,
        once for all its tasks). ``owners`` gets the object behind each argument buffer."""
        pickled = self.function_pickle(fn) if function is None else function
        limit = () if time_limit is None else (float(time_limit),)
        if _all_plain(args) and (not kwargs or _all_plain(kwargs.values())):
            return [pickle.dumps((pickled.reference, args, kwargs, *limit), protocol=5), *pickled.buffers]
        wrapped_args = tuple(_wrap(a) for a in args)
        wrapped_kwargs = {k: _wrap(v) for k, v in kwargs.items()}
        return [*dumps((pickled.reference, wrapped_args, wrapped_kwargs, *limit), owners), *pickled.buffers]

    def function_pickle(self, fn: Any) -> FunctionPickle:
        registry = _registry()
        if registry != self._by_value_modules:  # what pickles by reference just changed
            self._cache.clear()
            self._by_value_modules = frozenset(registry)
        cached = self._cache.get(id(fn))
        if cached is not None and cached[0] is fn and cached[1] == ():
            return cached[2]  # pickled by reference: its pickle is its name, which cannot change
        fingerprint = _fingerprint(fn, FINGERPRINT_DEPTH, set())
        if cached is not None and cached[0] is fn and cached[1] == fingerprint:
            return cached[2]
        if fingerprint != ():  # pickled by value: now, and only now, its code is read
            remember_code(fn)
        pickled = pickle_function(fn)
        if fingerprint is None:
            return pickled
        if len(self._cache) >= FUNCTION_CACHE_SIZE:
            self._cache.clear()
        self._cache[id(fn)] = (fn, fingerprint, pickled)
        return pickled


_MISSING = object()


def _registry() -> Any:
    # The modules registered with cloudpickle.register_pickle_by_value. Its own set is compared, not
    # a copy of it (what the public listing makes), since this is looked at on every submit.
    registered = getattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", None)
    if isinstance(registered, set):
        return registered
    listing = getattr(cloudpickle, "list_registry_pickle_by_value", None)
    return listing() if listing is not None else frozenset()


def _all_plain(values: Iterable[Any]) -> bool:
    for value in values:
        if not is_plain(value):
            return False
    return True


def _fingerprint(obj: Any, depth: int, seen: set[int]) -> Optional[tuple[Any, ...]]:
    """What decides ``obj``'s pickle, as identities of immutable objects; None where that cannot be
    known without pickling it (a mutable value is captured, or it nests too deep)."""
    if _is_by_reference(obj):
        return ()
    if type(obj) is not types.FunctionType or depth == 0 or obj.__dict__:
        return None
    if id(obj) in seen:
        return ()  # recursion: the outer fingerprint already covers it
    seen.add(id(obj))
    parts: list[Any] = [obj.__code__, obj.__name__, obj.__qualname__, obj.__module__, obj.__doc__]
    captured: list[Any] = [obj.__globals__.get(name, _MISSING) for name in _global_names(obj.__code__)]
    captured += [_cell_contents(cell) for cell in obj.__closure__ or ()]
    captured += list(obj.__defaults__ or ())
    captured += list((obj.__kwdefaults__ or {}).values())
    captured += list(getattr(obj, "__annotations__", {}).values())
    for value in captured:
        if value is _MISSING or _is_atom(value) or type(value) is types.ModuleType:
            parts.append(value if value is _MISSING or type(value) is types.ModuleType else (type(value), value))
            continue
        inner = _fingerprint(value, depth - 1, seen)
        if inner is None:
            return None
        parts.append((id(value), inner))
        parts.append(value)  # kept alive with the fingerprint, so that its id stays its own
    return tuple(parts)


def _is_by_reference(obj: Any) -> bool:
    if type(obj) is types.BuiltinFunctionType:
        return isinstance(getattr(obj, "__self__", None), (types.ModuleType, type(None)))
    if type(obj) is types.FunctionType or isinstance(obj, type):
        try:
            return bool(cloudpickle.cloudpickle._should_pickle_by_reference(obj))
        except (AttributeError, TypeError):
            return False
    # Other callables (numpy's functions and ufuncs, say) that reduce to a name are pickled as that name.
    try:
        return isinstance(obj.__reduce_ex__(5), str) and getattr(obj, "__module__", "__main__") != "__main__"
    except Exception:
        return False


def _global_names(code: types.CodeType) -> frozenset[str]:
    names = _names_cache.get(code)
    if names is None:
        found = set(code.co_names)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                found |= _global_names(const)
        names = _names_cache[code] = frozenset(found)
    return names


_names_cache: "weakref.WeakKeyDictionary[types.CodeType, frozenset[str]]" = weakref.WeakKeyDictionary()


def _cell_contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return _MISSING


def explain_load_failure(exc: BaseException, where: str) -> None:
    """Note on ``exc``, raised while unpickling a task, what failed and how to fix it."""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        top = exc.name.partition(".")[0]
        note = (f"zmqexecutor: loading the task failed on {where}: module {exc.name!r} is not importable "
                f"there. Install it on that worker (or put it on its PYTHONPATH), or send it with the task: "
                f"import {top}; cloudpickle.register_pickle_by_value({top}) in the client.")
    else:
        note = f"zmqexecutor: loading (unpickling) the task failed on {where}."
    add_note(exc, note)


def add_note(exc: BaseException, note: str) -> None:
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:  # Python 3.10: kept where 3.11 keeps it; the traceback text adds it (encode_exception)
        exc.__notes__ = [*getattr(exc, "__notes__", []), note]  # type: ignore[attr-defined]


class NotKept(Exception):
    """Raised when a call names a function by its key alone and this process does not have it."""


def _load_plainly(reference: Any, buffers: Sequence[Any]) -> Any:
    if isinstance(reference, bytes):
        return pickle.loads(reference)
    if len(buffers) != reference[2]:
        raise NotKept("the call names its function by its key alone")
    return pickle.loads(reference[1], buffers=buffers)


def decode_call(frames: Sequence[Any], load_function: Callable[[Any, Sequence[Any]], Any] = _load_plainly
                ) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], Optional[float]]:
    """(function, args, kwargs, time limit in seconds or None); ``load_function(reference, buffers)``
    unpickles the function (a task process's ``FunctionCache.load``)."""
    if not frames:
        raise ProtocolError("no pickle frame")
    if len(frames) == 1:  # most calls: no buffers at all
        call, function_buffers = pickle.loads(_as_buffer(frames[0])), []
    else:
        rest = iter([_as_buffer(f) for f in frames[1:]])
        call = pickle.loads(_as_buffer(frames[0]), buffers=rest)  # takes the arguments' buffers only
        function_buffers = list(rest)
    if not (isinstance(call, tuple) and len(call) in (3, 4) and _is_reference(call[0], len(function_buffers))
            and isinstance(call[1], tuple) and isinstance(call[2], dict)
            and (len(call) == 3 or (isinstance(call[3], float) and call[3] > 0))):
        raise ProtocolError("task payload is not (function, args, kwargs[, time limit]) with the function's buffers")
    reference, args, kwargs = call[:3]
    fn = load_function(reference, function_buffers)
    return fn, args, kwargs, call[3] if len(call) == 4 else None


def _is_reference(reference: Any, buffer_count: int) -> bool:
    # A function with buffers comes with all of them, or with none: then the process that gets it has
    # decoded it before (the embedded worker's lanes know what they sent each process).
    if isinstance(reference, bytes):
        return buffer_count == 0
    return (isinstance(reference, tuple) and len(reference) == 3 and isinstance(reference[0], bytes)
            and len(reference[0]) == 32 and isinstance(reference[1], bytes) and isinstance(reference[2], int)
            and reference[2] > 0 and buffer_count in (0, reference[2]))


# --- results and initializers ---------------------------------------------------------------------


def encode_result(value: Any) -> list[Any]:
    if is_plain(value):
        return [pickle.dumps(value, protocol=5)]
    return dumps(_wrap(value))


def encode_initializer(initializer: Optional[Callable[..., Any]], initargs: tuple[Any, ...]) -> bytes:
    if initializer is None:
        return b""
    remember_code(initializer)
    return bytes(cloudpickle.dumps((initializer, tuple(initargs)), protocol=5))
