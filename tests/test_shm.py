"""Kept buffers in a memfd that task processes map: no sockets (this process plays both sides)."""

from __future__ import annotations

import pytest

from zmqexecutor._wire import _features
from zmqexecutor._wire._serialize import digest
from zmqexecutor._wire._shm import MAX_MEMFDS, MemfdBuffer, Unmappable, map_frames, shared_copy

pytestmark = pytest.mark.skipif(not _features.MEMFD, reason="no memfd_create here")

DATA = bytes(range(256)) * 8192  # 2 MiB


def test_a_task_maps_the_buffer_and_its_writes_stay_its_own() -> None:
    kept = MemfdBuffer(digest((DATA,)), DATA)
    first = map_frames([b"call", kept.marker])[1]
    second = map_frames([b"call", kept.marker])[1]
    assert bytes(first) == DATA and len(kept) == len(DATA)
    first[0:4] = b"XXXX"  # copy-on-write: the next task (and the supervisor's copy) see the original
    assert bytes(second) == DATA and bytes(map_frames([b"call", kept.marker])[1]) == DATA
    kept.close()


def test_a_buffer_let_go_is_unmappable_even_if_its_descriptor_number_is_used_again() -> None:
    kept = MemfdBuffer(digest((DATA,)), DATA)
    marker = kept.marker
    kept.close()
    with pytest.raises(Unmappable):
        map_frames([b"call", marker])
    other = MemfdBuffer(digest((b"y" * len(DATA),)), b"y" * len(DATA))  # takes the lowest free number
    try:
        assert other.fd == kept.fd
        with pytest.raises(Unmappable):  # the name says it is another buffer
            map_frames([b"call", marker])
    finally:
        other.close()


def test_small_buffers_and_those_past_the_descriptor_cap_are_kept_as_they_are() -> None:
    assert shared_copy(digest((b"x" * 100_000,)), b"x" * 100_000, 0) is None
    assert shared_copy(digest((DATA,)), DATA, MAX_MEMFDS) is None
    made = shared_copy(digest((DATA,)), DATA, MAX_MEMFDS - 1)
    assert made is not None
    made.close()


def test_frames_without_markers_pass_untouched_and_no_memfd_means_a_plain_copy(monkeypatch) -> None:
    frames = [b"call", DATA]
    assert map_frames(frames) is frames
    monkeypatch.setattr(_features, "MEMFD", False)
    assert shared_copy(digest((DATA,)), DATA, 0) is None


def test_a_worker_hands_its_kept_buffers_as_markers_and_lets_the_memfd_go_with_them() -> None:
    from zmqexecutor._wire import _protocol as proto
    from zmqexecutor._worker._keep import KeptBuffers

    kept = KeptBuffers(budget=3 << 20)  # room for one
    name = digest((DATA,))
    first = kept.resolve(b"c", [b"call", proto.keep_marker(name), DATA])
    again = kept.resolve(b"c", [b"call", proto.held_marker(name)])
    assert first is not None and again is not None and first[1] == again[1] and len(first[1]) < 100
    assert bytes(map_frames(again)[1]) == DATA and kept.memfds == 1
    other = b"o" * len(DATA)
    kept.resolve(b"c", [b"call", proto.keep_marker(digest((other,))), other])  # the first is let go
    assert kept.memfds == 1
    with pytest.raises(Unmappable):  # a task still queued with its marker: MISSING, sent again
        map_frames(again)
