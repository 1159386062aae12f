"""The Unix-socket link between a process and its task processes: whole messages, in order, any size."""

from __future__ import annotations

import multiprocessing
import os
import select
import socket
import struct
import threading
import time

import pytest

from zmqexecutor._wire._channel import (
    MAX_FRAMES,
    READ_SIZE,
    BufferPool,
    Link,
    Listener,
    Peer,
)

pytestmark = pytest.mark.timeout(60)


def _echo(path: str, count: int) -> None:
    """A task process's side, reduced: echo ``count`` messages with one frame added, then exit."""
    link = Link(path, give_up=lambda: False)
    echoed = 0
    while echoed < count:
        link.poll(1.0)
        for frames in link.receive():
            link.send([b"echo", *frames])
            echoed += 1
    link.close()


def _wait_for_peer(listener: Listener, deadline: float = 10.0) -> Peer:
    end = time.monotonic() + deadline
    while not listener.peers:
        assert time.monotonic() < end, "nobody connected"
        select.select([listener], [], [], 0.1)
        assert listener.receive() == []
    return next(iter(listener.peers.values()))


def _collect(listener: Listener, count: int, deadline: float = 30.0) -> list[tuple[Peer, list[bytes]]]:
    received: list[tuple[Peer, list[bytes]]] = []
    end = time.monotonic() + deadline
    while len(received) < count:
        assert time.monotonic() < end, f"only {len(received)} of {count} messages arrived"
        select.select([listener], [], [], 0.1)
        received += [(peer, [bytes(f) for f in frames]) for peer, frames in listener.receive()]
    return received


@pytest.fixture
def listener(tmp_path):
    listener = Listener(str(tmp_path / "sock"))
    yield listener
    listener.close()


@pytest.fixture
def echo_process(listener):
    processes = []

    def start(count: int) -> multiprocessing.process.BaseProcess:
        process = multiprocessing.get_context("fork").Process(target=_echo, args=(listener.path, count))
        process.start()
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.join(10)
        if process.is_alive():
            process.kill()


def test_messages_arrive_whole_in_order_with_their_frame_boundaries(listener, echo_process):
    messages = [[b"x" * n, b"", bytes(range(256)) * (n % 7)] for n in range(0, 3000, 7)]
    messages.append([os.urandom(3 << 20)])  # read into a buffer of its own
    messages.append([b"", b""])  # nothing but empty frames
    echo_process(len(messages))
    peer = _wait_for_peer(listener)
    for frames in messages:
        assert peer.send(frames)
    echoed = _collect(listener, len(messages))
    assert [frames for _, frames in echoed] == [[b"echo", *frames] for frames in messages]
    assert all(p is peer for p, _ in echoed)


def test_a_large_frame_never_blocks_the_sender_and_travels_uncut(listener, echo_process):
    payload = os.urandom(64 << 20)
    memory = memoryview(payload)
    echo_process(1)
    peer = _wait_for_peer(listener)
    started = time.monotonic()
    assert peer.send([b"head", memory[:1 << 20], memory[1 << 20:]])
    assert time.monotonic() - started < 1.0  # queued; written as the reader makes room
    assert peer.out, "64 MiB cannot fit in the socket's buffer at once"
    [(_, frames)] = _collect(listener, 1)
    assert frames[0] == b"echo" and frames[1] == b"head"
    assert frames[2] + frames[3] == payload
    assert not peer.out


def test_what_a_process_sent_before_it_ended_is_read_to_the_end(listener, tmp_path):
    process = multiprocessing.get_context("fork").Process(target=_send_and_exit, args=(listener.path,))
    process.start()
    peer = _wait_for_peer(listener)
    process.join(10)
    assert process.exitcode == 0
    messages = listener.read_to_end(peer)
    assert [bytes(frames[0]) for frames in messages] == [str(i).encode() * 1000 for i in range(200)]
    assert peer.closed and not peer.send([b"late"])


def _send_and_exit(path: str) -> None:
    link = Link(path, give_up=lambda: False)
    for i in range(200):
        link.send([str(i).encode() * 1000])
    os._exit(0)


def test_a_closed_link_closes_the_peer_and_sends_report_it(listener, echo_process):
    process = echo_process(0)  # connects, then leaves at once
    peer = _wait_for_peer(listener)
    process.join(10)
    end = time.monotonic() + 10
    while not peer.closed:
        assert time.monotonic() < end
        select.select([listener], [], [], 0.1)
        listener.receive()
    assert not peer.send([b"anyone?"])
    assert listener.peers == {}


def test_a_corrupt_stream_closes_the_connection(listener):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(listener.path)
    peer = _wait_for_peer(listener)
    sock.sendall(struct.pack("<I", MAX_FRAMES + 1) + b"\0" * 64)
    end = time.monotonic() + 10
    while not peer.closed:
        assert time.monotonic() < end
        select.select([listener], [], [], 0.1)
        assert listener.receive() == []
    assert sock.recv(1) == b""  # the other end was closed
    sock.close()


def test_a_link_waits_for_its_listener_and_gives_up_when_told(tmp_path):
    path = str(tmp_path / "later")
    calls = []

    def give_up() -> bool:
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(ConnectionError, match="nothing listens"):
        Link(path, give_up)
    assert len(calls) == 4


def test_reading_an_ended_peer_to_the_end_leaves_a_newer_one_with_its_number_alone(listener):
    first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    first.connect(listener.path)
    old = _wait_for_peer(listener)
    first.close()
    end = time.monotonic() + 10
    while not old.closed:  # its end of stream seen: gone from the listener, its number free again
        assert time.monotonic() < end
        select.select([listener], [], [], 0.1)
        listener.receive()
    second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    second.connect(listener.path)
    new = _wait_for_peer(listener)
    assert new.fd == old.fd  # the kernel hands out the lowest free number
    assert listener.read_to_end(old) == []
    second.sendall(struct.pack("<IQ", 1, 5) + b"hello")
    [(peer, frames)] = _collect(listener, 1)
    assert peer is new and [bytes(f) for f in frames] == [b"hello"]
    second.close()


def test_pooled_memory_is_used_again_only_once_nothing_refers_to_it():
    pool = BufferPool()
    first = pool.take(8 << 20)
    owner = id(first.obj)  # not the object: a reference would keep it in use
    kept = first[100:200]  # a view of a view, as an unpickled array's base would be
    del first
    while_kept = pool.take(8 << 20)
    assert id(while_kept.obj) != owner
    del kept
    again = pool.take(7 << 20)  # smaller fits
    assert id(again.obj) in (owner, id(while_kept.obj)) and len(again) == 7 << 20
    del while_kept, again
    small = [id(pool.take(1 << 20).obj) for _ in range(2)]  # for these, 8 MiB would waste too much
    assert owner not in small and small[0] == small[1]  # the first was free again for the second
    assert len(pool.free_when_done) == 3


def test_pooled_memory_stays_within_its_limit_and_trim_lets_go_of_it():
    pool = BufferPool(limit=20 << 20)
    held = [pool.take(8 << 20), pool.take(8 << 20)]
    extra = pool.take(8 << 20)  # over the limit while both are held: not kept
    assert extra.obj not in pool.free_when_done and len(pool.free_when_done) == 2
    del held, extra
    pool.trim()
    assert pool.free_when_done == []


def test_fresh_buffers_of_any_size_are_whole_zeroed_and_writable():
    # Large ones are populated by several threads, each its span: none may be left out or overlap.
    from zmqexecutor._wire._buffers import POPULATE_PART
    from zmqexecutor._wire._buffers import fresh_buffer as _fresh_buffer

    for size in (READ_SIZE + 1, 2 * POPULATE_PART - 1, 2 * POPULATE_PART, 5 * POPULATE_PART + 4097, 64 << 20):
        buffer = memoryview(_fresh_buffer(size))
        assert len(buffer) == size
        assert bytes(buffer) == bytes(size)
        buffer[0], buffer[size // 2], buffer[size - 1] = 1, 2, 3
        assert (buffer[0], buffer[size // 2], buffer[size - 1]) == (1, 2, 3)


def test_looking_for_a_message_awake_finds_one_that_comes_and_gives_up_in_time(listener, tmp_path) -> None:
    link = Link(listener.path, give_up=lambda: False)
    try:
        peer = _wait_for_peer(listener)
        started = time.monotonic()
        assert not link.look_for(0.05)
        assert 0.05 <= time.monotonic() - started < 1.0
        sender = threading.Timer(0.01, peer.send, ([b"now"],))
        sender.start()
        assert link.look_for(5.0)
        sender.join()
        assert [bytes(f) for f in link.receive()[0]] == [b"now"]
    finally:
        link.close()
