"""Malformed, replayed and hostile input thrown at a live worker and a live client.

After every example, legitimate tasks still work and no process has crashed; nothing from a peer
without a session is ever unpickled (canary files that an unpickled payload would write never appear).
"""

from __future__ import annotations

import pickle
import socket
import struct
import time
from pathlib import Path

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zmqexecutor import ZMQExecutor
from zmqexecutor._wire import _protocol as proto
from zmqexecutor._wire._protocol import Kind

# Run once, on the default interpreter; .ci/run skips these on the other Pythons (see pyproject.toml).
pytestmark = pytest.mark.slow

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


class Canary:
    """Unpickling this writes a file: proof that a payload was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "unpickled"))


def headers() -> st.SearchStrategy[bytes]:
    return st.builds(
        lambda magic, version, kind, ident: struct.pack("!2sBBQ", magic, version, kind, ident),
        st.sampled_from([b"ZX", b"ZY", b"\0\0"]),
        st.sampled_from([proto.PROTOCOL_VERSION, 0, 2, 255]),
        st.integers(0, 20),
        st.integers(0, 2**64 - 1),
    )


def frames_strategy() -> st.SearchStrategy[list[bytes]]:
    frame = st.one_of(
        st.binary(max_size=64),
        headers(),
        st.just(b""),
        st.just(b"{}"),
        st.just(b'{"slots": 1, "instance": 7}'),
        st.builds(lambda d: proto.encode_json(d), st.dictionaries(st.text(max_size=8), st.integers(), max_size=3)),
    )
    return st.one_of(
        st.lists(frame, min_size=1, max_size=6),
        st.tuples(headers(), st.lists(frame, max_size=4)).map(lambda t: [t[0], *t[1]]),
    )


@pytest.fixture(scope="module")
def live_worker():
    from conftest import WorkerProcess

    # Plain text, so that the hostile peers here reach the protocol parser (keys have tests of their own).
    worker = WorkerProcess("tcp://127.0.0.1:*", processes=1, extra=["--insecure"]).wait_ready()
    executor = ZMQExecutor(worker.endpoint, worker_timeout=2.0, insecure=True)
    yield worker, executor
    executor.shutdown()
    worker.stop()


def legitimate_work_still_runs(worker, executor) -> None:
    assert executor.submit(pow, 3, 3).result(timeout=30) == 27
    assert worker.process.poll() is None
    # The only task processes that may have died are those a (hostile) client asked to stop.
    log = worker.log()
    assert log.count("replacing it") == log.count("at its client's request"), log


# --- at the worker --------------------------------------------------------------------------------


@SETTINGS
@given(messages=st.lists(frames_strategy(), min_size=1, max_size=5), with_session=st.booleans())
def test_malformed_messages_do_not_hurt_the_worker(live_worker, messages, with_session) -> None:
    worker, executor = live_worker
    context = zmq.Context.instance()
    raw = context.socket(zmq.DEALER)
    raw.connect(worker.endpoint)
    try:
        if with_session:
            raw.send_multipart(proto.encode_hello(proto.local_versions(), b""))
            assert raw.poll(10_000)
            raw.recv_multipart()
        for frames in messages:
            raw.send_multipart(frames)
    finally:
        raw.close(linger=500)
    legitimate_work_still_runs(worker, executor)


def test_a_task_replayed_by_a_peer_without_a_session_never_runs(live_worker, tmp_path) -> None:
    worker, executor = live_worker
    canary = tmp_path / "canary"
    context = zmq.Context.instance()
    # The message a client with a session would send, captured as bytes and replayed by a stranger.
    task = [proto.encode_header(Kind.TASK, 42), *[bytes(f) for f in proto.encode_call(Canary(str(canary)).__reduce__()[0],
                                                                                       (Path(canary), "ran"), {})]]
    for _ in range(3):
        stranger = context.socket(zmq.DEALER)
        stranger.connect(worker.endpoint)
        stranger.send_multipart(task)
        assert stranger.poll(10_000)
        reply = stranger.recv_multipart()
        assert proto.decode_header(reply[0]) == proto.Header(Kind.REJECTED, 42)
        stranger.close(0)
    time.sleep(0.5)
    assert not canary.exists()
    legitimate_work_still_runs(worker, executor)


@SETTINGS
@given(garbage=st.binary(min_size=1, max_size=512))
def test_raw_tcp_garbage_does_not_hurt_the_worker(live_worker, garbage) -> None:
    worker, executor = live_worker
    host, port = worker.endpoint[len("tcp://"):].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        try:
            conn.sendall(garbage)
        except OSError:
            pass  # libzmq may already have hung up on us
    legitimate_work_still_runs(worker, executor)


def test_many_half_open_connections_are_survived_and_timed_out(live_worker) -> None:
    worker, executor = live_worker
    host, port = worker.endpoint[len("tcp://"):].rsplit(":", 1)
    idle = [socket.create_connection((host, int(port)), timeout=30) for _ in range(200)]
    try:
        legitimate_work_still_runs(worker, executor)
        # They never finish the ZMTP handshake, so the worker hangs up on them (HANDSHAKE_IVL).
        idle[0].settimeout(30)
        started = time.monotonic()
        try:
            while idle[0].recv(4096):
                pass
        except ConnectionResetError:
            pass
        assert time.monotonic() - started < 20
    finally:
        for conn in idle:
            conn.close()
    legitimate_work_still_runs(worker, executor)


# --- at the client --------------------------------------------------------------------------------


@pytest.fixture
def fake_worker():
    """A raw ROUTER that shakes hands like a worker and then says whatever the test wants."""
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    yield router, f"tcp://127.0.0.1:{port}"
    router.close(0)
    context.term()


def _serve(router, hostile: list[list[bytes]], future) -> None:
    """Answer handshakes and tasks like a worker until ``future`` is done; the hostile messages go
    out before the first reply. Some are well formed and mean something (a REJECTED drops the session):
    the client then shakes hands again and resends the task, so this keeps serving."""
    deadline = time.monotonic() + 30
    while not future.done() and time.monotonic() < deadline:
        if not router.poll(100):
            continue
        client, header, *rest = router.recv_multipart()
        kind = proto.decode_header(header).kind
        if kind == Kind.HELLO:
            welcome = dict(proto.local_versions(), slots=1, instance="fake", accepted=True, reason=None)
            router.send_multipart([client, *proto.encode_welcome(welcome)])
        elif kind == Kind.TASK:
            task_id = proto.decode_header(header).ident
            for frames in hostile:
                router.send_multipart([client, *frames])
            hostile = []
            fn, args, kwargs, _ = proto.decode_call(rest)
            router.send_multipart([client, proto.encode_header(Kind.RESULT, task_id),
                                   *[bytes(f) for f in proto.encode_result(fn(*args, **kwargs))]])


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(hostile=st.lists(frames_strategy(), max_size=5))
def test_malformed_replies_do_not_hurt_the_client(fake_worker, hostile, tmp_path_factory) -> None:
    router, endpoint = fake_worker
    canary = tmp_path_factory.mktemp("c") / "canary"
    bomb = pickle.dumps(Canary(str(canary)))
    # Replies for tasks the client never sent, carrying a payload that acts if unpickled.
    hostile = [*hostile, [proto.encode_header(Kind.RESULT, 987654321), bomb],
               [proto.encode_header(Kind.EXCEPTION, 987654322), proto.encode_json({"type": "x"}), bomb]]
    with ZMQExecutor(endpoint, connect_timeout=20, worker_timeout=30, insecure=True) as ex:  # a plain fake
        future = ex.submit(pow, 2, 5)
        _serve(router, hostile, future)
        assert future.result(timeout=1) == 32
        # Not broken: the executor still takes and runs tasks.
        again = ex.submit(pow, 3, 2)
        _serve(router, [], again)
        assert again.result(timeout=1) == 9
    assert not canary.exists()
