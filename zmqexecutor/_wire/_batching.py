"""How many messages go together as one BATCH: one set of limits for every hop that batches.

Runs wherever messages are batched: the client's I/O thread (tasks), the supervisor's loop thread
(replies to clients) and a task process (its replies, held while more tasks wait).

Bigger batches amortize more of each message's cost, but delay the first item by the copying of the
rest and, for held replies, by the waiting. Every batch takes its first item whatever its size.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, TypeVar

# Items in one message at most.
BATCH_ITEMS = 256

# Bytes in one message beyond its first item.
BATCH_BYTES = 1 << 20

# A task process holds its replies while more tasks wait, to send them together: up to BATCH_ITEMS,
# these many bytes, or this long. Longer holds make bigger batches, but a crash loses the held results
# with the process (their tasks fail), and the supervisor sends no more work until it hears back.
HOLD_BYTES = 256 * 1024
HOLD_SECONDS = 0.002

T = TypeVar("T")


def is_full(count: int, size: int, next_size: int, *, max_bytes: int = BATCH_BYTES) -> bool:
    """Whether a batch of ``count`` items and ``size`` bytes has no room for one of ``next_size``."""
    return count >= BATCH_ITEMS or (count > 0 and size + next_size > max_bytes)


def batches(items: Iterable[T], size_of: Callable[[T], int]) -> list[list[T]]:
    """``items`` in order, cut into batches within the limits."""
    cut: list[list[T]] = []
    size = 0
    for item in items:
        item_size = size_of(item)
        if not cut or is_full(len(cut[-1]), size, item_size):
            cut.append([])
            size = 0
        cut[-1].append(item)
        size += item_size
    return cut


def frames_size(frames: Any) -> int:
    return sum(map(len, frames))
