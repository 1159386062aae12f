"""Which argument buffers a task names by digest: no sockets."""

from __future__ import annotations

import numpy

from zmqexecutor._client._reuse import KEEP_MIN_BYTES, MapDigests, RepeatedBuffers
from zmqexecutor._wire._serialize import CallEncoder, digest


def first(array: object) -> object:
    return array


def named(repeats: RepeatedBuffers, *args: object, per_map: MapDigests | None = None) -> tuple[tuple[int, bytes], ...]:
    owners: list[object] = []
    frames = CallEncoder().encode(first, args, {}, owners=owners)
    return repeats.keepable(frames, owners, 1, per_map)


def test_an_argument_is_named_only_when_its_object_comes_again() -> None:
    repeats = RepeatedBuffers()
    data = numpy.zeros(KEEP_MIN_BYTES // 8 + 1)
    assert named(repeats, data) == ()  # a one-off argument costs no digest
    assert named(repeats, data) == ((1, digest((memoryview(data).cast("B"),))),)
    data[0] = 1.0  # changed in place: every submit hashes again, so the name follows the content
    assert named(repeats, data) == ((1, digest((memoryview(data).cast("B"),))),)
    assert named(repeats, numpy.zeros(KEEP_MIN_BYTES // 8 + 1)) == ()  # another object: not seen yet


def test_small_buffers_and_plain_values_are_never_named() -> None:
    repeats = RepeatedBuffers()
    small = numpy.zeros(1000)
    for _ in range(3):
        assert named(repeats, small) == () and named(repeats, 5) == ()


def test_bytes_which_cannot_be_weakly_referenced_are_recognised_by_their_ends() -> None:
    repeats = RepeatedBuffers()
    blob = b"b" * KEEP_MIN_BYTES
    assert named(repeats, blob) == ()
    assert named(repeats, blob) == ((1, digest((blob,))),)


def test_within_one_map_a_repeated_object_is_hashed_once() -> None:
    repeats, per_map = RepeatedBuffers(), MapDigests()
    data = numpy.ones(KEEP_MIN_BYTES // 8 + 1)
    assert named(repeats, data, per_map=per_map) == ()
    name = named(repeats, data, per_map=per_map)
    data[0] = 5.0  # during a map the object is taken as unchanged (ProcessPoolExecutor pickles later too)
    assert named(repeats, data, per_map=per_map) == name
    assert named(repeats, data, per_map=MapDigests()) != name  # the next map hashes it again


def test_each_argument_buffer_comes_with_the_object_it_belongs_to() -> None:
    data, blob = numpy.ones(KEEP_MIN_BYTES // 8 + 1), b"x" * KEEP_MIN_BYTES
    owners: list[object] = []
    frames = CallEncoder().encode(first, (data, 3, blob), {}, owners=owners)
    assert len(frames) == 3 and owners[0] is data and owners[1] is blob
    assert bytes(frames[2]) == blob and numpy.array_equal(numpy.frombuffer(frames[1]), data)


def test_a_shared_handle_is_named_from_its_first_task_while_it_lives() -> None:
    import gc

    from zmqexecutor import Shared

    repeats = RepeatedBuffers()
    handle = Shared({"rows": list(range(100_000))})
    repeats.share(handle)
    assert named(repeats, handle) == ((1, digest((handle.blob,))),)  # no second sighting needed
    assert named(repeats, [handle, handle]) == ((1, handle.key),)  # one pickle, one buffer
    del handle
    gc.collect()
    assert repeats._shared == {}  # forgotten with its handle: no pickle kept alive
