"""Demo: the same CPU-bound map on ProcessPoolExecutor and on ZMQExecutor's embedded local workers.

Run it with ``python examples/demo.py``. Switching to remote workers changes one line:
``ZMQExecutor(["tcp://node1:5555", "tcp://node2:5555"])``, plus, for workers on other hosts, the key
folder from ``zmqexecutor keygen`` (``keys=...`` or $ZMQEXECUTOR_KEYS; the README walks through it).
"""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

from zmqexecutor import ZMQExecutor


def count_primes(bounds: tuple[int, int]) -> int:
    """Pure-Python, CPU-bound: the number of primes in [low, high)."""
    low, high = bounds
    count = 0
    for n in range(max(low, 2), high):
        if all(n % d for d in range(2, int(n**0.5) + 1)):
            count += 1
    return count


def timed(make_executor, ranges, repeats: int = 3) -> tuple[float, int]:
    times = []
    total = 0
    with make_executor() as ex:
        list(ex.map(count_primes, ranges[:2]))  # warm up the workers
        for _ in range(repeats):
            started = time.perf_counter()
            total = sum(ex.map(count_primes, ranges))
            times.append(time.perf_counter() - started)
    return statistics.median(times), total


def main() -> None:
    workers = os.cpu_count() or 1
    step = 25_000
    ranges = [(i, i + step) for i in range(0, 16 * step, step)]
    print(f"Counting primes below {ranges[-1][1]:,} in {len(ranges)} tasks on {workers} local workers\n")

    started = time.perf_counter()
    expected = sum(map(count_primes, ranges))
    serial = time.perf_counter() - started

    pool_time, pool_total = timed(lambda: ProcessPoolExecutor(workers), ranges)
    zmq_time, zmq_total = timed(lambda: ZMQExecutor(max_workers=workers), ranges)
    assert pool_total == zmq_total == expected, (pool_total, zmq_total, expected)

    print(f"{'executor':<22}{'median time':>12}{'speed-up':>10}")
    for name, seconds in (("serial", serial), ("ProcessPoolExecutor", pool_time), ("ZMQExecutor", zmq_time)):
        print(f"{name:<22}{seconds:>11.3f}s{serial / seconds:>9.2f}x")
    print(f"\nprimes found: {expected:,} (identical on every executor)")

    # What ProcessPoolExecutor cannot pickle, ZMQExecutor sends as it is: a lambda closing over a local.
    offset = 1_000
    with ZMQExecutor(max_workers=workers) as ex:
        shifted = list(ex.map(lambda x: x + offset, range(5)))
    print(f"a lambda closing over a local variable: {shifted}")


if __name__ == "__main__":
    main()
