"""The wire protocol, tested without sockets."""

from __future__ import annotations

import functools
import json
import pickle
import struct

import cloudpickle
import numpy as np
import pytest

from zmqexecutor import RemoteError, RemoteTraceback
from zmqexecutor._wire import _protocol as proto
from zmqexecutor._wire import _serialize as serialize
from zmqexecutor._wire._namespace import FunctionCache, MainNamespace
from zmqexecutor._wire._protocol import Kind, ProtocolError
from zmqexecutor._wire._serialize import CallEncoder


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
    fn, args, kwargs, limit = proto.decode_call(frames)
    assert fn(*args, **kwargs) == 13 and limit is None


def test_a_time_limit_travels_with_the_call_and_a_bad_one_is_refused() -> None:
    encoder = serialize.CallEncoder()
    for args in [(1,), (np.ones(100_000),)]:  # the plain pickle, and the one with out-of-band frames
        *_, limit = proto.decode_call([bytes(f) for f in encoder.encode(abs, args, {}, 2.5)])
        assert limit == 2.5
    for bad in [0.0, -1.0, "5", None]:
        with pytest.raises(ProtocolError):
            proto.decode_call([pickle.dumps((pickle.dumps(abs), (1,), {}, bad), protocol=5)])


def test_large_numpy_array_travels_out_of_band() -> None:
    array = np.arange(1_000_000, dtype=np.float64)
    frames = proto.encode_call(np.sum, (array,), {})
    assert len(frames) == 2
    assert frames[1].nbytes == array.nbytes
    assert len(frames[0]) < 4096  # the pickle holds no array data
    fn, args, _, _ = proto.decode_call([bytes(f) for f in frames])
    assert np.array_equal(args[0], array)


def test_small_buffers_stay_in_band() -> None:
    frames = proto.dumps(np.arange(10))
    assert len(frames) == 1


def test_large_top_level_bytes_and_memoryview_travel_out_of_band() -> None:
    data = b"x" * (proto.OOB_MIN_BYTES + 1)
    view = memoryview(np.arange(100_000, dtype=np.int32)).cast("B").cast("i")
    frames = proto.encode_call(len, (data,), {"v": view})
    assert len(frames) == 3
    _, args, kwargs, _ = proto.decode_call([bytes(f) for f in frames])
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
    assert proto.decode_crash(frames) == {"exitcode": -9, "signal": "SIGKILL", "host": "h", "pid": 5,
                                          "timed_out": None}
    timed_out = proto.encode_crash(exitcode=-15, signal_name="SIGTERM", host="h", pid=5, timed_out=2.5)
    assert proto.decode_crash(timed_out)["timed_out"] == 2.5
    assert proto.decode_reason(proto.encode_reason("why")) == "why"


def test_initializer_encoding() -> None:
    assert proto.encode_initializer(None, ()) == b""
    initializer, initargs = proto.loads([proto.encode_initializer(max, (1, 2))])
    assert initializer(*initargs) == 2


# --- batches --------------------------------------------------------------------------------------


def test_a_batch_round_trip_packs_small_frames_and_keeps_large_ones_apart() -> None:
    large = b"L" * proto.PACK_LIMIT
    items = [proto.Item(Kind.TASK, 5, [b"ab", large, b""]), proto.Item(Kind.RESULT, 2**64 - 1, [b"zz"])]
    frames = proto.encode_messages(items)
    assert len(frames) == 4 and frames[3] is large  # header, index, packed small frames, the large one
    got = proto.split(proto.decode_header(frames[0]), [bytes(f) for f in frames])
    assert [(i.kind, i.ident, [bytes(f) for f in i.frames]) for i in got] == \
        [(Kind.TASK, 5, [b"ab", large, b""]), (Kind.RESULT, 2**64 - 1, [b"zz"])]


def test_pace_rides_in_a_batch_with_replies_as_microseconds_in_its_ident() -> None:
    frames = proto.encode_messages([proto.Item(Kind.RESULT, 7, [b"r"]), proto.Item(Kind.PACE, 2_500, [])])
    got = proto.split(proto.decode_header(frames[0]), [bytes(f) for f in frames])
    assert [(i.kind, i.ident, list(i.frames)) for i in got] == [(Kind.RESULT, 7, [b"r"]), (Kind.PACE, 2_500, [])]


def test_a_lone_message_is_sent_as_itself() -> None:
    frames = proto.encode_messages([proto.Item(Kind.TASK, 9, [b"call"])])
    assert proto.decode_header(frames[0]) == proto.Header(Kind.TASK, 9) and frames[1:] == [b"call"]
    assert proto.split(proto.decode_header(frames[0]), frames) == [proto.Item(Kind.TASK, 9, [b"call"])]


@pytest.mark.parametrize("mangle", [
    lambda f: [proto.encode_header(Kind.BATCH, 1), *f[1:]],  # a batch of one is not a batch
    lambda f: [proto.encode_header(Kind.BATCH, 3), *f[1:]],  # more messages than the index names
    lambda f: [f[0], f[1][:-1], *f[2:]],  # a truncated index
    lambda f: [f[0], f[1], f[2] + b"x", *f[3:]],  # packed bytes the index does not name
    lambda f: [f[0], f[1], f[2][:-1], *f[3:]],
    lambda f: [f[0], f[1], f[2], f[3], b"extra"],  # a large frame too many
    lambda f: [f[0], f[1], f[2]],  # a large frame too few
    lambda f: [f[0], bytes([int(Kind.HELLO)]) + f[1][1:], *f[2:]],  # a control message inside
    lambda f: f[:2],
])
def test_malformed_batches_are_refused(mangle) -> None:
    items = [proto.Item(Kind.TASK, 1, [b"a", b"L" * proto.PACK_LIMIT]), proto.Item(Kind.TASK, 2, [b"b"])]
    frames = [bytes(f) for f in proto.encode_messages(items)]
    bad = mangle(frames)
    with pytest.raises(ProtocolError):
        proto.split(proto.decode_header(bad[0]), bad)


def test_exited_round_trips_and_refuses_impossible_counters() -> None:
    frames = proto.encode_messages([proto.encode_exited(pid=42, started=7, finished=6, exitcode=-9, retired=False,
                                                        host="h")])
    header = proto.decode_header(frames[0])
    assert (header.kind, header.ident) == (Kind.EXITED, 42)
    info = proto.decode_exited(frames[1:])
    assert (info["started"], info["finished"], info["signal"], info["retired"]) == (7, 6, "SIGKILL", False)
    assert info["timed_out"] is None
    limited = proto.encode_exited(pid=42, started=7, finished=6, exitcode=-15, retired=False, host="h", timed_out=1.0)
    assert proto.decode_exited(limited.frames)["timed_out"] == 1.0
    batch = proto.encode_messages([proto.Item(Kind.EXITED, 42, frames[1:]), proto.Item(Kind.LOST, 1, [b"{}"])])
    first = proto.split(proto.decode_header(batch[0]), batch)[0]
    assert (first.kind, first.ident) == (Kind.EXITED, 42)  # a supervisor's replies go in batches
    bad = proto.encode_exited(pid=42, started=1, finished=2, exitcode=0, retired=True, host="h")
    with pytest.raises(ProtocolError, match="more tasks finished than started"):
        proto.decode_exited(bad.frames)
    with pytest.raises(ProtocolError, match="valid pid"):
        proto.decode_exited([proto.encode_json({"started": 1, "finished": 1})])


def test_a_crash_names_the_signal_or_the_exit_code() -> None:
    assert proto.describe_exit(-9) == ("SIGKILL", "was killed by SIGKILL")
    assert proto.describe_exit(3) == (None, "exited with code 3")


# --- pickling a function once -------------------------------------------------------------------


def test_a_function_pickled_by_reference_is_pickled_once(monkeypatch) -> None:
    encoder = CallEncoder()
    by_reference = [np.sum, pow, json.dumps]  # numpy's dispatcher, a builtin, a module's function
    first = [encoder.function_pickle(fn) for fn in by_reference]
    monkeypatch.setattr(serialize.cloudpickle, "dumps", lambda *a, **k: pytest.fail("pickled again"))
    assert [encoder.function_pickle(fn) for fn in by_reference] == first


SCALE = 2


def test_a_by_value_function_is_pickled_again_when_what_it_captures_is_rebound() -> None:
    global SCALE
    encoder = CallEncoder()

    def times(x):
        return x * SCALE

    def run(fn):
        f, args, kwargs, _ = proto.decode_call(encoder.encode(fn, (3,), {}))
        return f(*args, **kwargs)

    try:
        assert run(times) == 6
        assert encoder.function_pickle(times) is encoder.function_pickle(times)  # cached while unchanged
        SCALE = 5
        assert run(times) == 15  # a rebound global is sent
        times_again = lambda x: x * SCALE + 1  # noqa: E731 - a new definition is new code
        assert run(times_again) == 16
    finally:
        SCALE = 2


def test_a_function_that_captures_a_mutable_value_is_never_cached() -> None:
    encoder = CallEncoder()
    config = {"n": 1}

    def read():
        return config["n"]

    assert proto.decode_call(encoder.encode(read, (), {}))[0]() == 1
    config["n"] = 2  # changed in place: no identity changes, so only pickling again can see it
    assert proto.decode_call(encoder.encode(read, (), {}))[0]() == 2


def test_a_task_process_decodes_each_function_pickle_once() -> None:
    cache = FunctionCache()
    blob = cloudpickle.dumps(lambda: 42)
    fn = cache.load(blob)
    assert fn() == 42 and cache.load(bytes(blob)) is fn


def first_plus(array: np.ndarray, x: int) -> float:
    return float(array[0]) + x


def test_an_array_inside_the_callable_travels_out_of_band_after_the_arguments() -> None:
    inner = np.arange(200_000, dtype=np.float64)
    argument = np.ones(100_000)
    frames = CallEncoder().encode(functools.partial(first_plus, inner), (argument,), {})
    assert [memoryview(f).nbytes for f in frames[1:]] == [argument.nbytes, inner.nbytes]
    assert len(frames[0]) < 4096  # neither array inside the call's pickle
    fn, args, _, _ = proto.decode_call([bytes(f) for f in frames])
    assert fn(1) == 1.0 and np.array_equal(args[0], argument)


def test_a_function_with_buffers_is_named_by_its_content_and_decoded_once_per_name() -> None:
    array = np.arange(100_000, dtype=np.float64)
    first = serialize.pickle_function(functools.partial(first_plus, array))
    again = serialize.pickle_function(functools.partial(first_plus, array.copy()))
    assert first.key == again.key and len(first.key) == 32  # the same content, however often pickled
    array[0] = 7.0  # changed in place: another name
    changed = serialize.pickle_function(functools.partial(first_plus, array))
    assert changed.key != first.key
    cache = FunctionCache()
    fn = cache.load(first.reference, [bytes(b) for b in first.buffers])
    assert cache.load(again.reference, [bytes(b) for b in again.buffers]) is fn
    assert cache.load(changed.reference, [bytes(b) for b in changed.buffers])(0) == 7.0


def test_a_call_whose_function_buffers_do_not_add_up_is_refused() -> None:
    two = functools.partial(first_plus, np.ones(100_000), np.zeros(100_000))
    frames = [bytes(f) for f in CallEncoder().encode(two, (), {})]
    with pytest.raises(ProtocolError, match="function's buffers"):
        proto.decode_call(frames[:-1])  # one of its two buffers left out
    with pytest.raises(ProtocolError, match="function's buffers"):
        proto.decode_call([bytes(f) for f in CallEncoder().encode(abs, (1,), {})] + [b"extra"])


def test_a_function_named_by_its_key_alone_is_used_if_the_process_has_it() -> None:
    pickled = serialize.pickle_function(functools.partial(first_plus, np.full(100_000, 3.0)))
    whole = [bytes(f) for f in CallEncoder().encode(abs, (1,), {}, function=pickled)]
    named = whole[:-1]  # as the embedded worker's lanes send it to a process that decoded it before
    cache = FunctionCache()
    with pytest.raises(serialize.NotKept):
        proto.decode_call(named, cache.load)
    fn, args, _, _ = proto.decode_call(whole, cache.load)
    again, _, _, _ = proto.decode_call(named, cache.load)
    assert again is fn and fn(*args) == 4.0


def test_plain_arguments_and_results_take_the_c_pickler() -> None:
    assert serialize.is_plain((1, "a", None, 2.5)) and serialize.is_plain(b"abc")
    assert not serialize.is_plain([{"a": 1}]) and not serialize.is_plain(object())
    assert not serialize.is_plain("x" * proto.OOB_MIN_BYTES)  # large: a frame of its own instead
    assert proto.loads(proto.encode_result((1, "a"))) == (1, "a")


_MAIN_SOURCE = """
x = {x}
state = {state!r}
def get():
    return x
def set_x(value):
    global x
    x = value
def closure(k):
    return lambda: (k, x)
def fill(key, value):
    state[key] = value
def read(key):
    return state.get(key)
"""


def _as_sent_from_main(x: int, state: dict | None = None) -> dict:
    # What cloudpickle rebuilds for functions of the client's __main__: their own copy of its globals,
    # a fresh one for each function that arrives.
    namespace = {"__name__": "__main__"}
    exec(_MAIN_SOURCE.format(x=x, state=state or {}), namespace)
    return namespace


def test_main_functions_share_one_namespace_where_the_process_rebinding_stands() -> None:
    main = MainNamespace()
    first = _as_sent_from_main(1)
    assert main.adopt(first["get"])() == 1
    main.adopt(first["set_x"])(5)  # an initializer setting a global
    assert main.adopt(first["get"])() == 5
    again = _as_sent_from_main(1)  # another function brings x = 1 again, unchanged: the process's value stands
    assert main.adopt(again["get"])() == 5
    assert main.adopt(again["closure"](7))() == (7, 5)  # closures keep their cells
    later = _as_sent_from_main(2)  # the client's x is now 2: it arrives
    assert main.adopt(later["get"])() == 2
    assert main.adopt(abs) is abs  # importable functions are left alone


def test_a_global_filled_in_place_stays_filled_until_the_client_changes_it() -> None:
    main = MainNamespace()
    main.adopt(_as_sent_from_main(1)["fill"])("tag", "hello")  # an initializer filling a dict
    assert main.adopt(_as_sent_from_main(1)["read"])("tag") == "hello"  # the client's {} again: ignored
    assert main.adopt(_as_sent_from_main(1, {"v": 2})["read"])("v") == 2  # the client filled it: it arrives
    assert main.adopt(_as_sent_from_main(1, {"v": 2})["read"])("tag") is None


def test_a_global_the_process_never_rebound_follows_the_client() -> None:
    main = MainNamespace()
    assert main.adopt(_as_sent_from_main(1)["get"])() == 1
    assert main.adopt(_as_sent_from_main(3)["get"])() == 3


def test_cancel_round_trips_and_refuses_a_bad_seq() -> None:
    relayed = proto.encode_cancel(17)
    assert proto.decode_header(relayed[0]) == proto.Header(Kind.CANCEL, 17)
    assert proto.decode_cancel(relayed[1:]) is None
    direct = proto.encode_cancel(4242, seq=3)
    assert proto.decode_header(direct[0]).ident == 4242 and proto.decode_cancel(direct[1:]) == 3
    for bad in [{"seq": -1}, {"seq": "3"}, {"seq": True}, {}]:
        with pytest.raises(ProtocolError):
            proto.decode_cancel([json.dumps(bad).encode()])
    with pytest.raises(ProtocolError):
        proto.decode_cancel([b"{}", b"{}"])


def test_join_carries_the_workers_instance_and_refuses_one_without() -> None:
    frames = proto.encode_join({"instance": "abc", "host": "node1", "pid": 42, "slots": 4})
    assert proto.decode_header(frames[0]).kind == proto.Kind.JOIN
    assert proto.decode_join(frames)["slots"] == 4
    with pytest.raises(proto.ProtocolError, match="without the worker's instance id"):
        proto.decode_join([frames[0], proto.encode_json({"host": "node1"})])
    with pytest.raises(proto.ProtocolError, match="frames"):
        proto.decode_join(frames[:1])


def test_a_lone_task_is_a_task_of_its_own_kind_for_a_task_process() -> None:
    lone = proto.process_task(7, b"client", b"", [b"call"], lone=True)
    plain = proto.process_task(7, b"client", b"", [b"call"])
    assert (lone.kind, plain.kind) == (proto.Kind.LONE_TASK, proto.Kind.TASK)
    assert lone.frames == plain.frames == [b"client", b"", b"call"]
    frames = proto.encode_messages([lone])
    header = proto.decode_header(frames[0])
    assert (header.kind, header.ident) == (proto.Kind.LONE_TASK, 7)


def test_bare_messages_status_replies_and_rejections_round_trip() -> None:
    [frame] = proto.encode_bare(Kind.TERMINATE, 9)
    assert proto.decode_header(frame) == proto.Header(Kind.TERMINATE, 9)
    with pytest.raises(ValueError, match="RESULT is not a message of its header alone"):
        proto.encode_bare(Kind.RESULT)
    status = {"slots": 4, "busy": 1}
    assert proto.decode_status_reply(proto.encode_status_reply(status)) == status
    with pytest.raises(ProtocolError, match="not a status reply"):
        proto.decode_status_reply([proto.encode_header(Kind.PONG), proto.encode_json(status)])
    rejected = proto.encode_rejected(3, "no session")
    assert proto.decode_header(rejected[0]).kind == Kind.REJECTED
    assert proto.decode_reason(rejected[1:]) == "no session"
