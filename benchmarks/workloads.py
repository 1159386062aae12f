"""The workloads: each takes an open executor and returns its measurement.

Task functions live here, at module level, so every system can import them by reference.
"""

from __future__ import annotations

import statistics
import time
import tracemalloc
from concurrent.futures import Executor, wait
from typing import Any, Callable

WORKERS = 2

# Full size, quick size.
SIZES: dict[str, tuple[float, float]] = {
    "throughput": (10_000, 500),
    "latency": (1_000, 100),
    "map": (100_000, 10_000),
    "payload": (64 * 1024 * 1024, 8 * 1024 * 1024),
    "cpu": (0.25, 0.05),
    "memory": (100_000, 10_000),
    "send-once": (64 * 1024 * 1024, 8 * 1024 * 1024),
}
# Send-once: this many tasks (full, quick) that all get the same array, in one of three forms.
SEND_ONCE_TASKS = (40, 8)
SCALING_WORKERS = (1, 4, 16, 64)
SCALING_WORKERS_QUICK = (1, 4)
SCALING_TASK_SECONDS = 0.01

# Heterogeneous tasks: this many, durations drawn uniformly from this range with this seed (quick: a
# quarter of them, ten times shorter).
HETEROGENEOUS_TASKS = 64
HETEROGENEOUS_SECONDS = (0.01, 1.0)
HETEROGENEOUS_SEED = 20261129

# Dispatch: sleep tasks (the cores stay free for the client) against this many single-slot workers.
DISPATCH_WORKERS = (1, 8, 64)
DISPATCH_WORKERS_QUICK = (1, 8)
DISPATCH_TASKS = (4000, 400)
DISPATCH_TASK_SECONDS = 0.001


def noop() -> None:
    return None


def echo(x: Any) -> Any:
    return x


def square(x: int) -> int:
    return x * x


def sleep(seconds: float) -> None:
    time.sleep(seconds)


def spin(iterations: int) -> int:
    total = 0
    for i in range(iterations):
        total += i
    return total


def process_chunk(chunk: list[int]) -> list[int]:
    return [square(x) for x in chunk]


def warm_up(ex: Executor, workers: int = WORKERS) -> None:
    """Make sure every worker process is up and has imported what the workloads use (NumPy too), so
    that neither start-up nor imports are counted in other workloads."""
    list(ex.map(warm, [0.05] * (2 * workers)))


def warm(seconds: float) -> None:
    import numpy  # noqa: F401  (the payload workload's first echo must not pay for the import)

    time.sleep(seconds)


def define_in_main() -> Callable[[], None]:
    """A no-op defined in ``__main__``, as a script's or a notebook's functions are: pickled by value."""
    import sys

    namespace = vars(sys.modules["__main__"])
    exec("def noop_from_main():\n    return None\n", namespace)
    fn: Callable[[], None] = namespace["noop_from_main"]
    return fn


def _size(name: str, quick: bool) -> float:
    full, small = SIZES[name]
    return small if quick else full


def throughput(ex: Executor, quick: bool, system: str, fn: Callable[[], None] = noop) -> dict[str, Any]:
    n = int(_size("throughput", quick))
    ex.submit(fn).result()
    started = time.perf_counter()
    done, _ = wait([ex.submit(fn) for _ in range(n)])
    elapsed = time.perf_counter() - started
    assert len(done) == n
    return {"value": n / elapsed, "unit": "tasks/s", "better": "higher"}


def main_function(ex: Executor, quick: bool, system: str) -> dict[str, Any]:
    """Throughput of no-ops defined in ``__main__`` (the function is defined before the pool starts)."""
    return throughput(ex, quick, system, MAIN_NOOP)


MAIN_NOOP: Callable[[], None] = noop  # replaced by define_in_main() in the measuring process


def heterogeneous(ex: Executor, quick: bool, system: str) -> dict[str, Any]:
    """Makespan of mixed-length sleep tasks over the bound of list scheduling them in order."""
    import heapq
    import random

    rng = random.Random(HETEROGENEOUS_SEED)
    low, high = HETEROGENEOUS_SECONDS
    count = HETEROGENEOUS_TASKS // 4 if quick else HETEROGENEOUS_TASKS
    durations = [rng.uniform(low, high) / (10 if quick else 1) for _ in range(count)]
    slots = [0.0] * WORKERS
    for seconds in durations:  # each task, in order, to the slot that frees up first
        heapq.heappush(slots, heapq.heappop(slots) + seconds)
    bound = max(slots)
    started = time.perf_counter()
    wait([ex.submit(sleep, seconds) for seconds in durations])
    makespan = time.perf_counter() - started
    return {"value": makespan / bound, "unit": "makespan / list-scheduling bound", "better": "lower",
            "bound_s": bound}


def dispatch(ex: Executor, quick: bool, system: str, workers: int) -> dict[str, Any]:
    """The client's own CPU per task (all its threads), against ``workers`` single-slot workers."""
    warm_up(ex, workers)
    n = DISPATCH_TASKS[1 if quick else 0]
    cpu = time.process_time()
    started = time.perf_counter()
    wait([ex.submit(sleep, DISPATCH_TASK_SECONDS) for _ in range(n)])
    elapsed = time.perf_counter() - started
    return {"value": (time.process_time() - cpu) / n * 1e6, "unit": "client CPU us/task", "better": "lower",
            "tasks_per_s": n / elapsed}


def latency(ex: Executor, quick: bool, system: str) -> dict[str, Any]:
    n = int(_size("latency", quick))
    for _ in range(10):
        ex.submit(noop).result()
    started = time.perf_counter()
    for _ in range(n):
        ex.submit(noop).result()
    return {"value": (time.perf_counter() - started) / n * 1e6, "unit": "us/round trip", "better": "lower"}


def map_small(ex: Executor, quick: bool, system: str) -> dict[str, Any]:
    n = int(_size("map", quick))
    items = range(n)
    started = time.perf_counter()
    if system == "dask":  # its executor ignores chunksize; send the same chunks by hand
        chunks = [list(items[i:i + 1000]) for i in range(0, n, 1000)]
        results = [x for chunk in ex.map(process_chunk, chunks) for x in chunk]
    else:
        results = list(ex.map(square, items, chunksize=1000))
    elapsed = time.perf_counter() - started
    assert results[-1] == (n - 1) ** 2 and len(results) == n
    return {"value": n / elapsed, "unit": "items/s", "better": "higher"}


def first_plus(array: Any, x: int) -> float:
    return float(array[0]) + x


def _send_once(ex: Executor, quick: bool, form: str, system: str) -> dict[str, Any]:
    """A map whose every task gets the same large array: as an argument, inside a
    ``functools.partial``, or as a global of ``__main__`` that the mapped function reads. Under
    ``dask-scatter`` the array is scattered to every worker first and every form passes its future.
    ``ideal``: one task per worker with an array of that size (each its own, so that nothing is
    reused), all at once, then the map with a tiny one: one transfer per worker, then no cost."""
    import functools

    import numpy as np

    nbytes = int(_size("send-once", quick))
    tasks = SEND_ONCE_TASKS[1 if quick else 0]
    array = np.ones(nbytes // 8)
    own_arrays = [np.ones(nbytes // 8) for _ in range(WORKERS)] if form == "ideal" else []
    started = time.perf_counter()
    if system == "dask-scatter":
        shared: Any = ex._client.scatter(array, broadcast=True, hash=False)  # type: ignore[attr-defined]
        fn: Callable[..., float] = first_plus
        iterables: tuple[Any, ...] = ([shared] * tasks, range(tasks))
    elif form == "argument":
        fn, iterables = first_plus, ([array] * tasks, range(tasks))
    elif form == "partial":
        fn, iterables = functools.partial(first_plus, array), (range(tasks),)
    elif form == "closure":
        fn, iterables = _global_reader_in_main(array), (range(tasks),)
    else:
        firsts = [ex.submit(first_plus, own, 0) for own in own_arrays]
        assert [first.result() for first in firsts] == [1.0] * WORKERS
        fn, iterables = functools.partial(first_plus, np.ones(1)), (range(tasks),)
    results = list(ex.map(fn, *iterables))
    elapsed = time.perf_counter() - started
    assert results == [1.0 + x for x in range(tasks)]
    return {"value": elapsed, "unit": f"s for {tasks} tasks sharing {nbytes >> 20} MiB", "better": "lower"}


def _global_reader_in_main(array: Any) -> Callable[[int], float]:
    """A function of ``__main__`` that reads ``array`` as a global, as a script's would."""
    import sys

    namespace = vars(sys.modules["__main__"])
    namespace["SEND_ONCE_ARRAY"] = array
    exec("def first_of_global(x):\n    return float(SEND_ONCE_ARRAY[0]) + x\n", namespace)
    fn: Callable[[int], float] = namespace["first_of_global"]
    return fn


def payload(ex: Executor, quick: bool, system: str) -> dict[str, Any]:
    """The first large echo: every buffer on the way is fresh memory (warmed with a small one)."""
    return _time_echoes(lambda array: ex.submit(echo, array).result().nbytes, quick, again=False)


def payload_again(ex: Executor, quick: bool, system: str) -> dict[str, Any]:
    """Large echoes after one of the same size: what a program that keeps sending them sees."""
    return _time_echoes(lambda array: ex.submit(echo, array).result().nbytes, quick, again=True)


# payload-again: the median of this many echoes, after the one of the same size.
PAYLOAD_AGAIN_ECHOES = 3


def _time_echoes(echo_once: Callable[[Any], int], quick: bool, again: bool) -> dict[str, Any]:
    import numpy as np

    nbytes = int(_size("payload", quick))
    array = np.ones(nbytes // 8)
    echo_once(array if again else np.ones(1024))
    times = []
    for _ in range(PAYLOAD_AGAIN_ECHOES if again else 1):
        started = time.perf_counter()
        returned = echo_once(array)
        times.append(time.perf_counter() - started)
        assert returned == nbytes
    unit = f"s for {nbytes >> 20} MiB in+out" + (", again" if again else "")
    return {"value": statistics.median(times), "unit": unit, "better": "lower"}


def payload_floor(quick: bool, again: bool = False) -> dict[str, Any]:
    """The same bytes echoed by a plain pyzmq DEALER/ROUTER pair between two processes: the floor."""
    import multiprocessing

    import zmq

    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    port = dealer.bind_to_random_port("tcp://127.0.0.1")
    child = multiprocessing.get_context("spawn").Process(target=_echo_router, args=(port,))
    child.start()

    def echo_once(array: Any) -> int:
        dealer.send(array, copy=False)
        return len(dealer.recv(copy=False).buffer)

    try:
        dealer.send(b"warm-up")
        dealer.recv()
        return _time_echoes(echo_once, quick, again)
    finally:
        dealer.send(b"")
        child.join(30)
        dealer.close(0)
        context.term()


def _echo_router(port: int) -> None:
    import zmq

    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.connect(f"tcp://127.0.0.1:{port}")
    while True:
        peer, message = router.recv_multipart(copy=False)
        if not len(message.buffer):
            break
        router.send_multipart([peer, message], copy=False)
    router.close(0)
    context.term()


def calibrate_spin(seconds: float) -> int:
    iterations = 100_000
    while True:
        started = time.perf_counter()
        spin(iterations)
        elapsed = time.perf_counter() - started
        if elapsed > 0.05:
            return int(iterations * seconds / elapsed)
        iterations *= 2


def cpu_bound(ex: Executor, quick: bool, system: str) -> dict[str, Any]:
    seconds = _size("cpu", quick)
    tasks = 4 if quick else 8
    iterations = calibrate_spin(seconds)
    started = time.perf_counter()
    list(ex.map(spin, [iterations] * tasks))
    elapsed = time.perf_counter() - started
    ideal = tasks * seconds / WORKERS
    return {"value": ideal / elapsed, "unit": "efficiency (ideal/actual)", "better": "higher"}


def memory(ex: Executor, quick: bool, system: str) -> dict[str, Any]:
    n = int(_size("memory", quick))
    # Enough long tasks to fill every slot and whatever each pool sends ahead, so the no-ops stay pending.
    blockers = [ex.submit(sleep, 1.0 if quick else 8.0) for _ in range((2 if quick else 4) * WORKERS)]
    time.sleep(0.2 if quick else 0.5)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    pending = [ex.submit(noop) for _ in range(n)]
    time.sleep(0.2)  # let the I/O thread take them in
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    for future in pending + blockers:  # the blockers not started yet need not run either
        future.cancel()
    wait(blockers)
    payload_bytes = 0
    if system.startswith("zmq"):
        from zmqexecutor._wire import _protocol

        payload_bytes = sum(memoryview(f).nbytes for f in _protocol.encode_call(noop, (), {}))
    return {"value": used / n - payload_bytes, "unit": "bytes/pending future beyond its payload",
            "better": "lower", "payload_bytes": payload_bytes}


def scaling(ex: Executor, quick: bool, system: str, workers: int) -> dict[str, Any]:
    warm_up(ex, workers)
    tasks = 20 * workers
    started = time.perf_counter()
    list(ex.map(sleep, [SCALING_TASK_SECONDS] * tasks))
    elapsed = time.perf_counter() - started
    ideal = workers / SCALING_TASK_SECONDS
    return {"value": (tasks / elapsed) / ideal, "unit": "fraction of the ideal rate", "better": "higher"}


WORKLOADS: dict[str, Callable[..., dict[str, Any]]] = {
    "throughput": throughput,
    "latency": latency,
    "map": map_small,
    "payload": payload,
    "payload-again": payload_again,
    "cpu": cpu_bound,
    "memory": memory,
    "main-function": main_function,
    "heterogeneous": heterogeneous,
    "send-once-argument": lambda ex, quick, system: _send_once(ex, quick, "argument", system),
    "send-once-partial": lambda ex, quick, system: _send_once(ex, quick, "partial", system),
    "send-once-closure": lambda ex, quick, system: _send_once(ex, quick, "closure", system),
    "send-once-ideal": lambda ex, quick, system: _send_once(ex, quick, "ideal", system),
}
