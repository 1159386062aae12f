"""The wire protocol, tested without sockets."""

from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest

from zmqexecutor import RemoteError, RemoteTraceback
from zmqexecutor import _protocol as proto
from zmqexecutor._protocol import Kind, ProtocolError


def test_header_round_trip() -> None:
    for kind in Kind:
        raw = proto.encode_header(kind, 2**64 - 1)
        assert len(raw) == proto.HEADER_SIZE == 12
        header = proto.decode_header(raw)
        assert (header.kind, header.ident, header.version) == (kind, 2**64 - 1, proto.PROTOCOL_VERSION)


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"", "header of 0 bytes"),
        (b"ZX" + b"\0" * 11, "header of 13 bytes"),
        (struct.pack("!2sBBQ", b"AB", 1, 3, 7), "bad magic"),
        (struct.pack("!2sBBQ", b"ZX", proto.PROTOCOL_VERSION, 99, 7), "unknown message kind 99"),
        (struct.pack("!2sBBQ", b"ZX", 9, 3, 7), "protocol version 9"),
    ],
)
def test_bad_headers_are_rejected(raw: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        proto.decode_header(raw)


def test_other_protocol_version_is_readable_on_request() -> None:
    raw = struct.pack("!2sBBQ", b"ZX", 9, int(Kind.HELLO), 0)
    assert proto.decode_header(raw, any_version=True).version == 9


def test_expect_frames() -> None:
    proto.expect_frames([b"a", b"b"], 2, 2)
    with pytest.raises(ProtocolError, match="3 frames, expected 2"):
        proto.expect_frames([b"a", b"b", b"c"], 2, 2)
    with pytest.raises(ProtocolError, match="0 frames"):
        proto.expect_frames([], 1)


def test_json_frames_are_validated() -> None:
    assert proto.decode_json(proto.encode_json({"a": 1})) == {"a": 1}
    for bad in (b"\xff\xfe", b"[1, 2]", b"{not json", b" " * (proto.MAX_JSON_BYTES + 1)):
        with pytest.raises(ProtocolError):
            proto.decode_json(bad)


def test_version_mismatch_names_both_sides() -> None:
    ours = proto.local_versions()
    assert proto.version_mismatch(ours, dict(ours), us="client", them="worker") is None
    theirs = dict(ours, python="2.7", cloudpickle="0.0.1")
    text = proto.version_mismatch(ours, theirs, us="client", them="worker w")
    assert text is not None
    assert f"python {ours['python']} on client vs 2.7 on worker w" in text
    assert f"cloudpickle {ours['cloudpickle']} on client vs 0.0.1 on worker w" in text
    assert "protocol" not in text


def test_hello_and_welcome_round_trip() -> None:
    info = dict(proto.local_versions(), max_tasks_per_child=3)
    frames = proto.encode_hello(info, b"init")
    assert proto.decode_header(frames[0]).kind == Kind.HELLO
    assert proto.decode_hello(frames) == (info, b"init")
    welcome = dict(proto.local_versions(), slots=4, instance="abc", accepted=True)
    assert proto.decode_welcome(proto.encode_welcome(welcome)) == welcome


@pytest.mark.parametrize("limit", [0, -1, "3", True, 1.5])
def test_hello_rejects_bad_max_tasks_per_child(limit: object) -> None:
    frames = proto.encode_hello(dict(proto.local_versions(), max_tasks_per_child=limit), b"")
    with pytest.raises(ProtocolError, match="max_tasks_per_child"):
        proto.decode_hello(frames)


@pytest.mark.parametrize("welcome", [{"slots": 0, "instance": "x"}, {"slots": "2", "instance": "x"}, {"slots": 2}])
def test_welcome_is_validated(welcome: dict) -> None:
    with pytest.raises(ProtocolError):
        proto.decode_welcome(proto.encode_welcome(welcome))


def test_call_round_trip_with_closure() -> None:
    offset = 10
    frames = proto.encode_call(lambda x, y=0: x + y + offset, (1,), {"y": 2})
    fn, args, kwargs = proto.decode_call(frames)
    assert fn(*args, **kwargs) == 13


def test_large_numpy_array_travels_out_of_band() -> None:
    array = np.arange(1_000_000, dtype=np.float64)
    frames = proto.encode_call(np.sum, (array,), {})
    assert len(frames) == 2
    assert frames[1].nbytes == array.nbytes
    assert len(frames[0]) < 4096  # the pickle holds no array data
    fn, args, _ = proto.decode_call([bytes(f) for f in frames])
    assert np.array_equal(args[0], array)


def test_small_buffers_stay_in_band() -> None:
    frames = proto.dumps(np.arange(10))
    assert len(frames) == 1


def test_large_top_level_bytes_and_memoryview_travel_out_of_band() -> None:
    data = b"x" * (proto.OOB_MIN_BYTES + 1)
    view = memoryview(np.arange(100_000, dtype=np.int32)).cast("B").cast("i")
    frames = proto.encode_call(len, (data,), {"v": view})
    assert len(frames) == 3
    _, args, kwargs = proto.decode_call([bytes(f) for f in frames])
    assert type(args[0]) is bytes and args[0] == data
    assert kwargs["v"].format == "i" and kwargs["v"].tolist() == view.tolist()
    result = proto.loads([bytes(f) for f in proto.encode_result(data)])
    assert result == data


def test_decode_call_rejects_wrong_payload() -> None:
    with pytest.raises(ProtocolError):
        proto.decode_call([pickle.dumps("not a call")])


def test_exception_round_trip_keeps_type_and_remote_traceback() -> None:
    try:
        {}["missing"]
    except KeyError as exc:
        frames = proto.encode_exception(exc, host="h1", pid=42)
    rebuilt = proto.decode_exception(frames, endpoint="tcp://w:1")
    assert type(rebuilt) is KeyError and rebuilt.args == ("missing",)
    cause = rebuilt.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "host h1, pid 42, endpoint tcp://w:1" in str(cause)
    assert "test_exception_round_trip_keeps_type_and_remote_traceback" in str(cause)


class _Unpicklable(Exception):
    def __reduce__(self):  # type: ignore[override]
        raise TypeError("no pickling for you")


def test_unpicklable_exception_arrives_as_remote_error() -> None:
    try:
        raise _Unpicklable("boom")
    except _Unpicklable as exc:
        frames = proto.encode_exception(exc, host="h", pid=1)
    rebuilt = proto.decode_exception(frames, endpoint="e")
    assert isinstance(rebuilt, RemoteError)
    assert rebuilt.type_name.endswith("_Unpicklable") and rebuilt.message == "boom"
    assert "could not be pickled: no pickling for you" in rebuilt.traceback_text
    assert "raise _Unpicklable" in str(rebuilt.__cause__)


def test_exception_that_fails_to_unpickle_on_the_client_arrives_as_remote_error() -> None:
    meta = proto.encode_json({"type": "mod.Gone", "message": "m", "traceback": "tb\n", "host": "h", "pid": 1})
    rebuilt = proto.decode_exception([meta, b"\x80\x05garbage"], endpoint="e")
    assert isinstance(rebuilt, RemoteError)
    assert (rebuilt.type_name, rebuilt.message) == ("mod.Gone", "m")
    assert "could not be unpickled on the client" in rebuilt.traceback_text
    assert pickle.loads(pickle.dumps(rebuilt)).type_name == "mod.Gone"


def test_crash_and_reason_round_trip() -> None:
    frames = proto.encode_crash(exitcode=-9, signal_name="SIGKILL", host="h", pid=5)
    assert proto.decode_crash(frames) == {"exitcode": -9, "signal": "SIGKILL", "host": "h", "pid": 5}
    assert proto.decode_reason(proto.encode_reason("why")) == "why"


def test_initializer_encoding() -> None:
    assert proto.encode_initializer(None, ()) == b""
    initializer, initargs = proto.loads([proto.encode_initializer(max, (1, 2))])
    assert initializer(*initargs) == 2
