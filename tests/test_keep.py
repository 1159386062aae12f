"""Buffers a worker keeps for its clients, and how a client names them: no sockets."""

from __future__ import annotations

from concurrent.futures import Future

from zmqexecutor._client._connection import _marked
from zmqexecutor._client._scheduler import Task
from zmqexecutor._wire import _protocol as proto
from zmqexecutor._wire._serialize import digest
from zmqexecutor._worker._keep import KeptBuffers
from zmqexecutor._wire._shm import map_frames

BIG, OTHER, THIRD = b"x" * 100_000, b"y" * 100_000, b"z" * 100_000
A, B, C = (digest((buffer,)) for buffer in (BIG, OTHER, THIRD))


def task_with(buffer: bytes, digest: bytes) -> Task:
    return Task(1, Future(), [b"\x80call", b"arg" * 30_000, buffer], 200_000, ((2, digest),))


def test_a_client_sends_a_buffer_once_with_keep_then_names_it() -> None:
    held: set[bytes] = set()
    first = _marked(task_with(BIG, A), held, budget=1 << 20)
    assert first[2] == proto.keep_marker(A) and first[3] == BIG and held == {A}
    second = _marked(task_with(BIG, A), held, budget=1 << 20)
    assert second[:2] == first[:2] and second[2] == proto.held_marker(A) and len(second) == 3
    too_big = _marked(task_with(BIG, B), held, budget=1000)  # more than the worker keeps: as it is
    assert too_big[2] == BIG and B not in held


def contents(frames: object) -> list[bytes]:
    """What a task process gets from these frames (it maps what the worker keeps in a memfd)."""
    assert isinstance(frames, list)
    return [bytes(frame) for frame in map_frames(frames)]


def test_a_worker_keeps_what_it_is_told_per_client_and_puts_it_back() -> None:
    kept = KeptBuffers(budget=1 << 20)
    frames = [b"\x80call", proto.keep_marker(A), BIG]
    assert contents(kept.resolve(b"c1", frames)) == [b"\x80call", BIG]
    assert contents(kept.resolve(b"c1", [b"\x80call", proto.held_marker(A)])) == [b"\x80call", BIG]
    assert kept.resolve(b"c2", [b"\x80call", proto.held_marker(A)]) is None  # another client's: not its
    assert kept.counts == {"received": 1, "reused": 1, "missing": 1, "refused": 0}
    plain = [b"\x80call", BIG]
    assert kept.resolve(b"c1", plain) is plain  # no marker: untouched
    kept.forget(b"c1")
    assert kept.size == 0 and kept.resolve(b"c1", [b"\x80call", proto.held_marker(A)]) is None


def test_a_worker_over_its_budget_lets_the_least_recently_used_go() -> None:
    kept = KeptBuffers(budget=250_000)
    for name, buffer in ((A, BIG), (B, OTHER)):
        kept.resolve(b"c", [b"\x80call", proto.keep_marker(name), buffer])
    kept.resolve(b"c", [b"\x80call", proto.held_marker(A)])  # A used last
    kept.resolve(b"c", [b"\x80call", proto.keep_marker(C), THIRD])
    assert kept.size <= 250_000
    assert kept.resolve(b"c", [b"\x80call", proto.held_marker(B)]) is None
    assert kept.resolve(b"c", [b"\x80call", proto.held_marker(A)]) is not None
    nothing = KeptBuffers(budget=0)  # --cache-size 0: keeps nothing, the task still runs
    assert contents(nothing.resolve(b"c", [b"\x80call", proto.keep_marker(A), BIG])) == [b"\x80call", BIG]
    assert nothing.size == 0


def test_a_buffer_that_does_not_hash_to_its_name_runs_once_and_is_not_kept() -> None:
    # The client names a buffer at submit and sends it later from the caller's memory: changed in
    # between, it must not be kept under the old content's name.
    kept = KeptBuffers(budget=1 << 20)
    assert contents(kept.resolve(b"c", [b"\x80call", proto.keep_marker(A), OTHER])) == [b"\x80call", OTHER]
    assert kept.size == 0 and kept.counts["refused"] == 1 and kept.counts["received"] == 0
    assert kept.resolve(b"c", [b"\x80call", proto.held_marker(A)]) is None  # so the client resends
