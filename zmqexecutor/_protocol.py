"""The wire protocol: every message kind, its frames, and its encoder and decoder.

Every message is a ZeroMQ multipart message whose first frame is a fixed 12-byte header::

    magic b"ZX" | protocol version (u8) | kind (u8) | id (u64)        network byte order

The header is parsed with ``struct`` alone; nothing that follows it is unpickled before the header
has been validated, and only the party that needs a pickle ever unpickles it (the worker supervisor
never does). The layout of the header never changes between versions, so any version can read the
peer's version byte and report a mismatch instead of failing later.

Client <-> worker supervisor (a DEALER per endpoint to the worker's bound ROUTER)::

    HELLO        c -> w  [hdr(0), json client info, initializer pickle or b""]
    WELCOME      w -> c  [hdr(0), json worker info incl. slots, instance id, accepted, reason]
    TASK         c -> w  [hdr(task id), call pickle, *out-of-band buffers]
    RESULT       w -> c  [hdr(task id), result pickle, *out-of-band buffers]
    EXCEPTION    w -> c  [hdr(task id), json {type, message, traceback, host, pid}, exception pickle or b""]
    INIT_FAILED  w -> c  same frames as EXCEPTION: the initializer raised
    CRASHED      w -> c  [hdr(task id), json {exitcode, signal, host, pid}]
    REJECTED     w -> c  [hdr(task id or 0), json {reason}]: the worker has no session for this client;
                         the client treats its tasks there as lost and shakes hands again
    PING         c -> w  [hdr(0)]: liveness, sent every heartbeat interval; refreshes the session
    PONG         w -> c  [hdr(0)]: the answer to PING (REJECTED(0) instead when there is no session)
    TERMINATE    c -> w  [hdr(signal number)]: send this signal to the task processes running this
                         client's tasks, and drop its queued tasks (``terminate_workers()``)
    DROPPED      w -> c  [hdr(task id), json {reason}]: a queued task dropped, unstarted, on TERMINATE
    OUTPUT       w -> c  [hdr(task id), json {stdout, stderr, truncated, host, pid}]: what the task
                         printed: whole lines while it runs, the rest just before its reply
                         (task process -> supervisor -> client)
    STATUS       c -> w  [hdr(0)]: ``zmqexecutor status``; needs no session and unpickles nothing
    STATUS_REPLY w -> c  [hdr(0), json {versions, slots, busy, queued, done, failed, crashed, clients,
                         uptime, instance, host, pid}]
    BYE          c -> w  [hdr(0)]: the client is done; the worker forgets its session

A HELLO from a client the worker already knows starts a new session: the client sends it only after
it has given up on every task it had there, so the tasks still queued for it are dropped. A session
that hears nothing from its client for a few of the client's timeouts is dropped the same way.

Worker supervisor <-> task process (a DEALER per task process to the supervisor's ROUTER)::

    READY        t -> s  [hdr(pid)]
    TASK         s -> t  [hdr(task id), session id, initializer pickle or b"", call pickle, *buffers]
    RESULT, EXCEPTION, INIT_FAILED
                 t -> s  as above; the supervisor forwards them to the client untouched
    STOP         s -> t  [hdr(0)]: exit after the current task
"""

from __future__ import annotations

import enum
import io
import json
import pickle
import struct
import sys
import traceback
from typing import Any, Callable, NamedTuple, Sequence, Union

import cloudpickle
import zmq

from ._errors import RemoteError, RemoteTraceback

PROTOCOL_VERSION = 1
MAGIC = b"ZX"
_HEADER = struct.Struct("!2sBBQ")
HEADER_SIZE = _HEADER.size

# Buffers below this size are pickled in-band: a frame of its own costs more than copying a small
# buffer, while above it the saved memcpy dominates.
OOB_MIN_BYTES = 64 * 1024

# The largest task or result, in bytes, unless configured otherwise: big enough for real arrays,
# small enough that a mistake (or a hostile peer) cannot make a process allocate without bound.
DEFAULT_MAX_MESSAGE_SIZE = 1 << 30

# JSON frames (handshakes, error metadata) are small by construction; anything bigger is hostile.
MAX_JSON_BYTES = 1 << 20

Frame = Union[bytes, memoryview, zmq.Frame]


class Kind(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    TASK = 3
    RESULT = 4
    EXCEPTION = 5
    INIT_FAILED = 6
    CRASHED = 7
    REJECTED = 8
    BYE = 9
    READY = 10
    STOP = 11
    PING = 12
    PONG = 13
    TERMINATE = 14
    DROPPED = 15
    STATUS = 16
    STATUS_REPLY = 17
    OUTPUT = 18


_KINDS = frozenset(int(k) for k in Kind)


class ProtocolError(ValueError):
    """Raised when a message does not follow the wire protocol; it is logged and dropped."""


class Header(NamedTuple):
    kind: Kind
    ident: int
    version: int = PROTOCOL_VERSION


def as_buffer(frame: Frame) -> memoryview | bytes:
    if isinstance(frame, zmq.Frame):
        return frame.buffer
    return frame


def as_bytes(frame: Frame) -> bytes:
    if isinstance(frame, zmq.Frame):
        return frame.bytes
    return bytes(frame)


def encode_header(kind: Kind, ident: int = 0) -> bytes:
    return _HEADER.pack(MAGIC, PROTOCOL_VERSION, kind, ident)


def decode_header(frame: Frame, *, any_version: bool = False) -> Header:
    raw = as_bytes(frame)
    if len(raw) != HEADER_SIZE:
        raise ProtocolError(f"header of {len(raw)} bytes, expected {HEADER_SIZE}")
    magic, version, kind, ident = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}")
    if version != PROTOCOL_VERSION and not any_version:
        raise ProtocolError(f"protocol version {version}, expected {PROTOCOL_VERSION}")
    if kind not in _KINDS:
        raise ProtocolError(f"unknown message kind {kind}")
    return Header(Kind(kind), ident, version)


def expect_frames(frames: Sequence[Frame], minimum: int, maximum: int | None = None) -> None:
    if len(frames) < minimum or (maximum is not None and len(frames) > maximum):
        wanted = f"{minimum}" if maximum == minimum else f"{minimum}..{maximum if maximum else 'n'}"
        raise ProtocolError(f"{len(frames)} frames, expected {wanted}")


_MONITOR_EVENT = struct.Struct("=HI")


def read_monitor_event(monitor: zmq.Socket[Any], flags: int = 0) -> int:
    """The event number of one libzmq socket-monitor message (frames: event+value, endpoint)."""
    frames = monitor.recv_multipart(flags)
    return int(_MONITOR_EVENT.unpack_from(frames[0])[0])


def encode_json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def decode_json(frame: Frame) -> dict[str, Any]:
    raw = as_bytes(frame)
    if len(raw) > MAX_JSON_BYTES:
        raise ProtocolError(f"JSON frame of {len(raw)} bytes is over {MAX_JSON_BYTES}")
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"malformed JSON frame: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("JSON frame is not an object")
    return obj


# --- versions and the handshake -------------------------------------------------------------------


def local_versions() -> dict[str, Any]:
    from . import __version__

    return {
        "protocol": PROTOCOL_VERSION,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "cloudpickle": cloudpickle.__version__,
        "zmqexecutor": __version__,
    }


_COMPARED = ("protocol", "python", "cloudpickle")


def version_mismatch(ours: dict[str, Any], theirs: dict[str, Any], *, us: str, them: str) -> str | None:
    """Describe how two sides' versions differ, or return None when they can work together."""
    diffs = [
        f"{key} {ours.get(key)} on {us} vs {theirs.get(key)} on {them}"
        for key in _COMPARED
        if ours.get(key) != theirs.get(key)
    ]
    return "; ".join(diffs) if diffs else None


def encode_hello(info: dict[str, Any], init_blob: bytes) -> list[bytes]:
    return [encode_header(Kind.HELLO), encode_json(info), init_blob]


def decode_hello(frames: Sequence[Frame]) -> tuple[dict[str, Any], bytes]:
    expect_frames(frames, 3, 3)
    info = decode_json(frames[1])
    limit = info.get("max_tasks_per_child")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ProtocolError(f"bad max_tasks_per_child {limit!r}")
    timeout = info.get("timeout")
    if timeout is not None and (not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0):
        raise ProtocolError(f"bad timeout {timeout!r}")
    return info, as_bytes(frames[2])


def encode_welcome(info: dict[str, Any]) -> list[bytes]:
    return [encode_header(Kind.WELCOME), encode_json(info)]


def decode_welcome(frames: Sequence[Frame]) -> dict[str, Any]:
    expect_frames(frames, 2, 2)
    info = decode_json(frames[1])
    slots = info.get("slots")
    if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
        raise ProtocolError(f"bad slot count {slots!r}")
    if not isinstance(info.get("instance"), str):
        raise ProtocolError("missing worker instance id")
    return info


# --- pickling with out-of-band buffers -----------------------------------------------------------


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


def dumps(obj: Any) -> list[Any]:
    """Pickle ``obj`` into frames: the pickle, then each large buffer uncopied."""
    buffers: list[Any] = []

    def keep_out_of_band(buf: pickle.PickleBuffer) -> bool:
        try:
            raw = buf.raw()
        except BufferError:
            return True
        if raw.nbytes < OOB_MIN_BYTES:
            return True
        buffers.append(raw)
        return False

    stream = io.BytesIO()
    cloudpickle.Pickler(stream, protocol=5, buffer_callback=keep_out_of_band).dump(obj)
    # A small pickle is cheaper kept as bytes (copied once) than as a view pinning its BytesIO.
    head = stream.getvalue() if stream.tell() < OOB_MIN_BYTES else stream.getbuffer()
    return [head, *buffers]


def loads(frames: Sequence[Frame]) -> Any:
    if not frames:
        raise ProtocolError("no pickle frame")
    return pickle.loads(as_buffer(frames[0]), buffers=[as_buffer(f) for f in frames[1:]])


def encode_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    wrapped_args = tuple(_wrap(a) for a in args)
    wrapped_kwargs = {k: _wrap(v) for k, v in kwargs.items()}
    return dumps((fn, wrapped_args, wrapped_kwargs))


def decode_call(frames: Sequence[Frame]) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    call = loads(frames)
    if not (isinstance(call, tuple) and len(call) == 3):
        raise ProtocolError("task payload is not (fn, args, kwargs)")
    fn, args, kwargs = call
    return fn, tuple(args), dict(kwargs)


def encode_result(value: Any) -> list[Any]:
    return dumps(_wrap(value))


def encode_initializer(initializer: Callable[..., Any] | None, initargs: tuple[Any, ...]) -> bytes:
    if initializer is None:
        return b""
    return bytes(cloudpickle.dumps((initializer, tuple(initargs)), protocol=5))


# --- exceptions -----------------------------------------------------------------------------------


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<unprintable {type(exc).__name__} object>"


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    return cls.__qualname__ if module in ("builtins", "__main__") else f"{module}.{cls.__qualname__}"


def encode_exception(exc: BaseException, *, host: str, pid: int) -> list[Any]:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    meta = {"type": _type_name(exc), "message": _safe_str(exc), "traceback": text, "host": host, "pid": pid}
    try:
        blob = bytes(cloudpickle.dumps(exc, protocol=5))
    except Exception as pickling_error:
        meta["traceback"] = text + f"\n(the exception could not be pickled: {_safe_str(pickling_error)})\n"
        blob = b""
    return [encode_json(meta), blob]


def decode_exception(frames: Sequence[Frame], *, endpoint: str) -> BaseException:
    """Rebuild a task's exception with the remote traceback as its ``__cause__``."""
    expect_frames(frames, 2, 2)
    meta = decode_json(frames[0])
    type_name = str(meta.get("type", "Exception"))
    message = str(meta.get("message", ""))
    text = str(meta.get("traceback", ""))
    exc: BaseException | None = None
    if len(as_buffer(frames[1])):
        try:
            unpickled = loads(frames[1:])
            if isinstance(unpickled, BaseException):
                exc = unpickled
        except Exception as unpickling_error:
            text += f"\n(the exception could not be unpickled on the client: {_safe_str(unpickling_error)})\n"
    if exc is None:
        exc = RemoteError(type_name, message, text)
    heading = f"Traceback from a task on host {meta.get('host')}, pid {meta.get('pid')}, endpoint {endpoint}:"
    exc.__cause__ = RemoteTraceback(f'\n"""\n{heading}\n{text}"""')
    return exc


def encode_crash(*, exitcode: int | None, signal_name: str | None, host: str, pid: int) -> list[bytes]:
    return [encode_json({"exitcode": exitcode, "signal": signal_name, "host": host, "pid": pid})]


def decode_crash(frames: Sequence[Frame]) -> dict[str, Any]:
    expect_frames(frames, 1, 1)
    return decode_json(frames[0])


def encode_output(task_id: int, *, stdout: str, stderr: str, truncated: bool, host: str, pid: int) -> list[bytes]:
    meta = {"stdout": stdout, "stderr": stderr, "truncated": truncated, "host": host, "pid": pid}
    return [encode_header(Kind.OUTPUT, task_id), encode_json(meta)]


def decode_output(frames: Sequence[Frame]) -> dict[str, Any]:
    expect_frames(frames, 1, 1)
    output = decode_json(frames[0])
    if not all(isinstance(output.get(key), str) for key in ("stdout", "stderr")):
        raise ProtocolError("task output without stdout and stderr text")
    return output


def encode_reason(reason: str) -> list[bytes]:
    return [encode_json({"reason": reason})]


def decode_reason(frames: Sequence[Frame]) -> str:
    expect_frames(frames, 1, 1)
    return str(decode_json(frames[0]).get("reason", ""))
