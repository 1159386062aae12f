"""How messages are cut into batches: one set of limits for every hop (no sockets)."""

from __future__ import annotations

from zmqexecutor._wire._batching import BATCH_BYTES, BATCH_ITEMS, batches, is_full


def test_a_batch_is_full_at_its_count_or_when_the_next_item_would_pass_its_bytes() -> None:
    assert is_full(BATCH_ITEMS, 0, 1)
    assert not is_full(BATCH_ITEMS - 1, 0, 1)
    assert is_full(1, BATCH_BYTES, 1)
    assert not is_full(0, 0, BATCH_BYTES * 4)  # the first item goes whatever its size


def test_items_keep_their_order_across_batches() -> None:
    items = list(range(BATCH_ITEMS * 2 + 3))
    cut = batches(items, lambda _: 10)
    assert [len(b) for b in cut] == [BATCH_ITEMS, BATCH_ITEMS, 3]
    assert [x for b in cut for x in b] == items
    big = BATCH_BYTES // 2 + 1
    assert [len(b) for b in batches([1, 2, 3], lambda _: big)] == [1, 1, 1]
