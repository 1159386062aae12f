"""The wire protocol: every message kind, its frames, and its encoder and decoder.

Runs in every process; its codecs keep no state, so any thread.

Every message is a ZeroMQ multipart message whose first frame is a fixed 12-byte header::

    magic b"ZX" | protocol version (u8) | kind (u8) | id (u64)        network byte order

The header is parsed with ``struct`` alone; nothing that follows it is unpickled before the header
has been validated, and only the party that needs a pickle ever unpickles it (the worker supervisor
never does). The layout of the header never changes between versions, so any version can read the
peer's version byte and report a mismatch instead of failing later.

Client <-> worker supervisor (a DEALER per endpoint to the worker's bound ROUTER)::

    HELLO        c -> w  [hdr(0), json client info, initializer pickle or b""]
    WELCOME      w -> c  [hdr(0), json worker info incl. slots, instance id, accepted, reason,
                         resources ({name: amount}, what ``--resources`` offers)]
    TASK         c -> w  [hdr(task id), call pickle, *the arguments' buffers, *the function's buffers];
                         the call pickle is (function, args, kwargs) or, with a time limit, (...,
                         seconds); the function is its pickle, or (key, pickle, buffer count) when its
                         pickle has buffers of its own: ``key`` names its content (a digest), so that
                         a task process decodes it once
    NEEDY_TASK   c -> w  [hdr(task id), json {resource: amount}, *TASK's frames]: a task that holds
                         these amounts of the worker's resources while it runs (the worker runs it
                         only when they are free; one of the BATCHED kinds, like TASK)
    RESULT       w -> c  [hdr(task id), result pickle, *out-of-band buffers]
    EXCEPTION    w -> c  [hdr(task id), json {type, message, traceback, host, pid}, exception pickle or b""]
    INIT_FAILED  w -> c  same frames as EXCEPTION: the initializer raised
    CRASHED      w -> c  [hdr(task id), json {exitcode, signal, host, pid, timed_out, memory_limit?,
                         peak_memory?, oom_killed?}]; ``timed_out`` is the time limit the task ran past
                         when that is why its process was ended, ``memory_limit`` the memory limit
                         (bytes) it passed when that is, ``peak_memory`` the largest resident size the
                         worker saw, ``oom_killed`` set when the kernel's out-of-memory killer took it
    REJECTED     w -> c  [hdr(task id or 0), json {reason}]: the worker has no session for this client;
                         the client treats its tasks there as lost and shakes hands again
    PING         c -> w  [hdr(0)]: liveness, sent every heartbeat interval; refreshes the session
    PONG         w -> c  [hdr(0)]: the answer to PING (REJECTED(0) instead when there is no session)
    TERMINATE    c -> w  [hdr(signal number)]: send this signal to the task processes running this
                         client's tasks, and drop its queued tasks (``terminate_workers()``)
    CANCEL       c -> w  [hdr(task id)]: stop this task: dropped if still queued, its process killed
                         if running (``ZMQExecutor.cancel(future, force=True)``); the client has
                         already cancelled its future and ignores whatever comes back for it
    DROPPED      w -> c  [hdr(task id), json {reason}]: a queued task dropped, unstarted, on TERMINATE
                         or CANCEL
    LOST         w -> c  [hdr(task id), json {reason}]: the task ran, but its reply died with its task
                         process (which crashed in a later task); the client retries it as it does
                         the tasks of a lost worker
    OUTPUT       w -> c  [hdr(task id), json {stdout, stderr, truncated, host, pid}]: what the task
                         printed: whole lines while it runs, the rest just before its reply
                         (task process -> supervisor -> client)
    STATUS       c -> w  [hdr(0)]: ``zmqexecutor status``; needs no session and unpickles nothing
    DRAIN        c -> w  [hdr(0)]: ``zmqexecutor drain``: begin draining (as on SIGTERM); answered with
                         STATUS_REPLY; needs no session
    DRAINING     w -> c  [hdr(0)]: the worker is draining: it takes no more tasks, finishes those it
                         runs, then exits; the client sends it nothing more
    RETURNED     w -> c  [hdr(task id)]: a task handed back unstarted by a draining worker; the client
                         sends it elsewhere without counting a retry
    MISSING      w -> c  [hdr(task id)]: the task named a buffer (HELD, below) this worker no longer keeps;
                         the client sends the task again with the buffer, without counting a retry
    STATUS_REPLY w -> c  [hdr(0), json {versions, slots, busy, queued, done, failed, crashed, timed_out,
                         cancelled, clients, uptime, instance, host, pid, draining}]
    BYE          c -> w  [hdr(0)]: the client is done; the worker forgets its session
    BATCH        both    [hdr(count), index, packed, *large frames]: several TASKs (c -> w) or replies
                         (w -> c) in one message. ``index`` holds per message its kind, id and frame
                         count, then the length of every frame; frames under PACK_LIMIT are
                         concatenated in ``packed``, larger ones follow as frames of their own, in
                         order. A lone message goes as itself; every receiver takes both (``split``).

Buffers a worker keeps: a TASK's buffer frame (never smaller than OOB_MIN_BYTES) may be preceded by a
KEEP marker, ``b"ZXK"`` and a 32-byte digest (the worker keeps that buffer for the client's session,
within its ``keep_bytes``, which WELCOME tells), or replaced by a HELD marker, ``b"ZXH"`` and the digest
of a buffer the client sent it with KEEP before. A marker is 35 bytes, so it is never a buffer, and the
call pickle before them never starts with ``ZX``. The supervisor puts the buffers back before the task
process sees the task, and answers MISSING when it kept none under that digest.

A worker started with ``--connect`` dials the client instead (a DEALER to the client's bound
ROUTER, the ``listen`` address); once connected it speaks first, then everything above goes as usual::

    JOIN         w -> c  [hdr(0), json {instance, host, pid, slots}]: sent on every new connection;
                         the client answers with HELLO. A JOIN from a worker whose session is up
                         means it reconnected: the client counts its tasks there as lost and
                         shakes hands again

A HELLO from a client the worker already knows starts a new session: the client sends it only after
it has given up on every task it had there, so the tasks still queued for it are dropped. A session
that hears nothing from its client for a few of the client's timeouts is dropped the same way.

Worker supervisor <-> task process (a Unix socket in the supervisor's private folder, framed by
``_channel``, not ZeroMQ; every message may be a BATCH as above)::

    READY        t -> s  [hdr(pid)]
    TASK         s -> t  [hdr(task id), client id, initializer pickle or b"", call pickle, *buffers]
    RESULT, EXCEPTION, INIT_FAILED, OUTPUT
                 t -> s  as above; the supervisor forwards them to the client untouched
    STOP         s -> t  [hdr(0)]: exit after the tasks already sent

The embedded worker runs *direct*: its task processes connect to a Unix socket the client binds (in
the same private folder) and exchange the task-process messages above with the client itself; the
supervisor sees no task, only the processes, and tells the client when one ends::

    EXITED       w -> c  [hdr(pid), json {pid, started, finished, exitcode, signal, retired, host,
                         timed_out, memory_limit?, peak_memory?, oom_killed?}]: of the tasks the client sent that process, in order, the first
                         ``finished`` ran to the end, the next (if ``started`` is larger) was running
                         (past its time limit ``timed_out``, if that is set; the memory keys are
                         CRASHED's), the rest never started
    CANCEL       c -> w  [hdr(pid), json {seq}]: kill that process if the task it is running is the
                         ``seq``-th (from 0) the client sent it
    LONE_TASK    c -> t  as TASK, for a caller that waits for each reply before its next task: the
                         process looks for the next task awake a moment after replying (never
                         relayed: a supervisor refuses it from a client)
"""

from __future__ import annotations

import enum
import json
import signal
import struct
import sys
import traceback
from typing import Any, Callable, Mapping, NamedTuple, Sequence, Union

import cloudpickle
import zmq

from ._errors import ProtocolError, RemoteError, RemoteTraceback
from ._serialize import (
    OOB_MIN_BYTES,
    CallEncoder,
    decode_call,
    dumps,
    encode_initializer,
    encode_result,
    loads,
)
from ._resources import check_amounts
from ._tracebacks import locate_sent_code
from ._version import __version__

__all__ = ["ProtocolError", "OOB_MIN_BYTES", "decode_call", "dumps", "encode_initializer", "encode_result", "loads"]

# 2: BATCH, and calls carry their function as a pickle of its own.
# 4: the modules moved into _client, _worker, _wire and _tools; errors and other objects pickled by
#    reference now name zmqexecutor._wire._errors, which a version-3 peer cannot import.
# 5: a function whose pickle has large buffers (a partial or closure over an array) sends them as
#    frames of their own, after the arguments' (its reference in the call: key, pickle, count).
# 6: what names a kept buffer or a function pickle is a BLAKE3 digest (it was SHA-256): a version-5
#    worker would refuse every buffer a version-6 client asks it to keep.
# 7: PACE, a relaying worker's measure of how long its tasks run, which the client paces by: its own
#    measure (the gaps between replies) counts the time a worker waited for it, and with a thousand
#    workers to feed that made short tasks look long and every task a round trip of its own.
PROTOCOL_VERSION = 7
MAGIC = b"ZX"
_HEADER = struct.Struct("!2sBBQ")
HEADER_SIZE = _HEADER.size

# The largest task or result, in bytes, unless configured otherwise: big enough for real arrays,
# small enough that a mistake (or a hostile peer) cannot make a process allocate without bound.
DEFAULT_MAX_MESSAGE_SIZE = 1 << 30

# How long a peer may stay silent before it counts as gone, unless configured otherwise: the client's
# worker_timeout, which its HELLO tells the worker (whose session for it expires a few of these later).
DEFAULT_SILENCE_TIMEOUT = 5.0

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
    BATCH = 19
    LOST = 20
    EXITED = 21
    CANCEL = 22
    DRAIN = 23
    DRAINING = 24
    RETURNED = 25
    JOIN = 26
    LONE_TASK = 27
    MISSING = 28
    NEEDY_TASK = 29
    PACE = 30


_KINDS = {int(k): k for k in Kind}


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
    return Header(_KINDS[kind], ident, version)


def expect_frames(frames: Sequence[Frame], minimum: int, maximum: int | None = None) -> None:
    if len(frames) < minimum or (maximum is not None and len(frames) > maximum):
        wanted = f"{minimum}" if maximum == minimum else f"{minimum}..{maximum if maximum else 'n'}"
        raise ProtocolError(f"{len(frames)} frames, expected {wanted}")


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


# --- messages that are their header alone, and the status ----------------------------------------------

# PING PONG BYE STATUS DRAIN DRAINING (id 0), TERMINATE (id: the signal), STOP (to a task process).
BARE_KINDS = frozenset({Kind.PING, Kind.PONG, Kind.BYE, Kind.STATUS, Kind.DRAIN, Kind.DRAINING, Kind.TERMINATE,
                        Kind.STOP})


def encode_bare(kind: Kind, ident: int = 0) -> list[bytes]:
    """A message that is its header alone; read back with ``decode_header``."""
    if kind not in BARE_KINDS:
        raise ValueError(f"{kind.name} is not a message of its header alone")
    return [encode_header(kind, ident)]


def encode_status_reply(status: dict[str, Any]) -> list[bytes]:
    return [encode_header(Kind.STATUS_REPLY), encode_json(status)]


def decode_status_reply(frames: Sequence[Frame]) -> dict[str, Any]:
    expect_frames(frames, 2, 2)
    if decode_header(frames[0]).kind != Kind.STATUS_REPLY:
        raise ProtocolError("not a status reply")
    return decode_json(frames[1])


def encode_rejected(ident: int, reason: str) -> list[bytes]:
    """REJECTED: the worker has no session for the client (``ident``: the task that found none, or 0)."""
    return [encode_header(Kind.REJECTED, ident), *encode_reason(reason)]


# --- buffers a worker keeps -------------------------------------------------------------------------

KEEP_MARK = b"ZXK"
HELD_MARK = b"ZXH"
MARK_SIZE = 3 + 32


def keep_marker(digest: bytes) -> bytes:
    return KEEP_MARK + digest


def held_marker(digest: bytes) -> bytes:
    return HELD_MARK + digest


def read_marker(frame: Frame) -> tuple[bytes, bytes] | None:
    """(KEEP_MARK or HELD_MARK, digest) when ``frame`` is a marker, else None."""
    if len(frame) != MARK_SIZE:
        return None
    data = as_bytes(frame)
    if data[:3] not in (KEEP_MARK, HELD_MARK):
        return None
    return data[:3], data[3:]


# --- versions and the handshake -------------------------------------------------------------------


def local_versions() -> dict[str, Any]:
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
    if "resources" in info:
        try:
            info["resources"] = check_amounts(info["resources"], "the worker's resources")
        except (TypeError, ValueError) as exc:
            raise ProtocolError(str(exc)) from None
    return info


def needy_task(task_id: int, needs: Mapping[str, float], call: Sequence[Any]) -> Item:
    """NEEDY_TASK: a task that holds ``needs`` of the worker's resources while it runs."""
    return Item(Kind.NEEDY_TASK, task_id, [encode_json(dict(needs)), *call])


def decode_needs(frames: Sequence[Frame]) -> tuple[dict[str, float], Sequence[Frame]]:
    """A NEEDY_TASK's frames after the header: what it needs, and the call frames (TASK's)."""
    expect_frames(frames, 2)
    try:
        return check_amounts(decode_json(frames[0]), "a task's resources"), frames[1:]
    except (TypeError, ValueError) as exc:
        raise ProtocolError(str(exc)) from None


# --- calls and results (the pickling itself lives in _serialize) ----------------------------------


def encode_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """One call's frames, with nothing cached: for peers and tests; executors keep a ``CallEncoder``."""
    return CallEncoder().encode(fn, args, kwargs)


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
    if sys.version_info < (3, 11):  # notes are printed from 3.11 on
        text += "".join(f"{note}\n" for note in getattr(exc, "__notes__", ()))
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
    text = locate_sent_code(str(meta.get("traceback", "")))
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


def encode_crash(*, exitcode: int | None, signal_name: str | None, host: str, pid: int,
                 timed_out: float | None = None, **memory: Any) -> list[bytes]:
    """CRASHED: the task's process died while running it; ``timed_out``: the time limit in seconds
    it ran past, when that is why the worker ended it; ``memory``: see ``_taskpool.TaskProcess.memory_report``."""
    return [encode_json({"exitcode": exitcode, "signal": signal_name, "host": host, "pid": pid,
                         "timed_out": timed_out, **memory})]


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


# --- batches ----------------------------------------------------------------------------------------

# Per message: kind (u8), id (u64), frame count (u16); then per frame of every message its length
# (u32), with the top bit set for a frame that travels as a frame of its own.
_ENTRY = struct.Struct("<BQH")
_OWN_FRAME = 1 << 31

# Frames this big travel as frames of their own (never copied); smaller ones are packed into one
# frame, which costs a copy but saves the per-frame cost of ZeroMQ and pyzmq (several microseconds).
PACK_LIMIT = OOB_MIN_BYTES

# The kinds a BATCH may carry: tasks, their replies, and PACE, which only rides along with replies.
# Control messages always go alone.
BATCHED_KINDS = frozenset({Kind.TASK, Kind.NEEDY_TASK, Kind.RESULT, Kind.EXCEPTION, Kind.INIT_FAILED, Kind.CRASHED,
                           Kind.OUTPUT, Kind.DROPPED, Kind.LOST, Kind.EXITED, Kind.RETURNED, Kind.MISSING,
                           Kind.PACE})

# The most messages one BATCH may carry; a bigger count is malformed (senders stay far below).
MAX_BATCH = 65536


class Item(NamedTuple):
    """One message: its kind and id from the header, and the frames after it."""

    kind: Kind
    ident: int
    frames: Sequence[Any]


def encode_messages(items: Sequence[Item]) -> list[Any]:
    """One message for a lone item; a BATCH for several, small frames packed into one."""
    if len(items) == 1:
        kind, ident, frames = items[0]
        return [encode_header(kind, ident), *frames]
    entries = []
    lengths = []
    packed = []
    own = []
    for kind, ident, frames in items:
        entries.append(_ENTRY.pack(kind, ident, len(frames)))
        for frame in frames:
            buffer = as_buffer(frame)
            size = len(buffer) if isinstance(buffer, bytes) else memoryview(buffer).nbytes
            if size >= PACK_LIMIT:
                lengths.append(_OWN_FRAME)
                own.append(frame)
            else:
                lengths.append(size)
                packed.append(buffer)
    index = b"".join(entries) + struct.pack(f"<{len(lengths)}I", *lengths)
    return [encode_header(Kind.BATCH, len(items)), index, b"".join(packed), *own]


def split(header: Header, frames: Sequence[Any]) -> list[Item]:
    """The messages in ``frames`` (the header frame included): itself, or every item of a BATCH."""
    if header.kind != Kind.BATCH:
        return [Item(header.kind, header.ident, frames[1:])]
    count = header.ident
    expect_frames(frames, 3)
    index = as_bytes(frames[1])
    if not 2 <= count <= MAX_BATCH or len(index) < count * _ENTRY.size:
        raise ProtocolError(f"batch of {count} messages with an index of {len(index)} bytes")
    entries = list(_ENTRY.iter_unpack(index[:count * _ENTRY.size]))
    total = sum(entry[2] for entry in entries)
    if len(index) != count * _ENTRY.size + 4 * total:
        raise ProtocolError(f"batch index of {len(index)} bytes for {count} messages of {total} frames")
    lengths = struct.unpack_from(f"<{total}I", index, count * _ENTRY.size)
    packed = memoryview(as_buffer(frames[2])).cast("B")
    own = iter(frames[3:])
    position = 0
    items = []
    cursor = 0
    for kind, ident, nframes in entries:
        if _KINDS.get(kind) not in BATCHED_KINDS:
            raise ProtocolError(f"message kind {kind} inside a batch")
        parts: list[Any] = []
        for length in lengths[cursor:cursor + nframes]:
            if length == _OWN_FRAME:
                frame = next(own, None)
                if frame is None:
                    raise ProtocolError("batch index names more frames than the message has")
                parts.append(frame)
            else:
                parts.append(packed[position:position + length])
                position += length
        cursor += nframes
        items.append(Item(_KINDS[kind], ident, parts))
    if position != len(packed) or next(own, None) is not None:
        raise ProtocolError("batch index does not match the frames of the message")
    return items


# --- the handshake, both sides ------------------------------------------------------------------------


def answer_hello(header: Header, frames: Sequence[Frame], worker_info: dict[str, Any]
                 ) -> tuple[list[bytes], dict[str, Any] | None, bytes]:
    """The worker's WELCOME for a HELLO, and the client's info and initializer when it is accepted."""
    if header.version != PROTOCOL_VERSION:
        theirs: dict[str, Any] = {"protocol": header.version}
        init_blob = b""
    else:
        theirs, init_blob = decode_hello(frames)
    reason = version_mismatch(local_versions(), theirs, us="worker", them="client")
    welcome = dict(worker_info, **local_versions(), accepted=reason is None, reason=reason)
    return encode_welcome(welcome), (theirs if reason is None else None), init_blob


def read_welcome(header: Header, frames: Sequence[Frame], *, them: str) -> tuple[dict[str, Any], str | None]:
    """The worker's info from its WELCOME, and why this client cannot use it (None when it can)."""
    info = {"protocol": header.version} if header.version != PROTOCOL_VERSION else decode_welcome(frames)
    problem = version_mismatch(local_versions(), info, us="client", them=them)
    if problem is None and not info.get("accepted", False):
        problem = str(info.get("reason") or "the worker refused the handshake")
    return info, problem


def encode_join(info: dict[str, Any]) -> list[bytes]:
    return [encode_header(Kind.JOIN), encode_json(info)]


def decode_join(frames: Sequence[Frame]) -> dict[str, Any]:
    expect_frames(frames, 2, 2)
    info = decode_json(frames[1])
    if not isinstance(info.get("instance"), str):
        raise ProtocolError("JOIN without the worker's instance id")
    return info


# --- supervisor <-> task process ------------------------------------------------------------------------


def encode_ready(pid: int) -> list[bytes]:
    return [encode_header(Kind.READY, pid)]


def process_task(task_id: int, client: bytes, init_blob: bytes, call: Sequence[Any], *, lone: bool = False) -> Item:
    return Item(Kind.LONE_TASK if lone else Kind.TASK, task_id, [client, init_blob, *call])


def decode_process_task(frames: Sequence[Any]) -> tuple[bytes, Any, Sequence[Any]]:
    """A task process's TASK frames after the header: client id, initializer pickle, call frames."""
    expect_frames(frames, 3)
    return as_bytes(frames[0]), frames[1], frames[2:]


def encode_exited(*, pid: int, started: int, finished: int, exitcode: int | None, retired: bool,
                  host: str, timed_out: float | None = None, **memory: Any) -> Item:
    """EXITED, supervisor -> the client of a direct worker, as an item of its replies (it goes in a
    BATCH with them): a task process ended after starting ``started`` and finishing ``finished`` of the
    tasks it was sent; ``retired`` when it was told to; ``timed_out``, the time limit its running task
    ran past when that is why it was ended; ``memory``: see ``_taskpool.TaskProcess.memory_report``."""
    signal_name, _ = describe_exit(exitcode)
    return Item(Kind.EXITED, pid, [encode_json({
        "pid": pid, "started": started, "finished": finished, "exitcode": exitcode, "signal": signal_name,
        "retired": retired, "host": host, "timed_out": timed_out, **memory})])


def decode_exited(frames: Sequence[Frame]) -> dict[str, Any]:
    expect_frames(frames, 1, 1)
    info = decode_json(frames[0])
    for key in ("pid", "started", "finished"):
        if not isinstance(info.get(key), int) or info[key] < 0:
            raise ProtocolError(f"EXITED without a valid {key}")
    if info["finished"] > info["started"]:
        raise ProtocolError("EXITED with more tasks finished than started")
    return info


def describe_exit(exitcode: int | None) -> tuple[str | None, str]:
    """The signal that ended a process (or None), and "was killed by SIGKILL" / "exited with code 3"."""
    signal_name = None
    if exitcode is not None and exitcode < 0:
        try:
            signal_name = signal.Signals(-exitcode).name
        except ValueError:
            signal_name = f"signal {-exitcode}"
    return signal_name, f"was killed by {signal_name}" if signal_name else f"exited with code {exitcode}"


def encode_cancel(ident: int, seq: int | None = None) -> list[bytes]:
    """CANCEL for task ``ident`` (relayed), or for process ``ident``'s ``seq``-th task (direct)."""
    header = encode_header(Kind.CANCEL, ident)
    return [header] if seq is None else [header, encode_json({"seq": seq})]


def decode_cancel(frames: Sequence[Frame]) -> int | None:
    """The ``seq`` of a direct CANCEL (the frames after the header), None for a relayed one."""
    expect_frames(frames, 0, 1)
    if not frames:
        return None
    seq = decode_json(frames[0]).get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise ProtocolError("CANCEL without a valid seq")
    return seq
