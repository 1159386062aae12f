"""The executor contract as the stdlib documents it, on the embedded local workers."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import functools
import gc
import glob
import itertools
import operator
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import weakref
from typing import Any
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pytest
from conftest import ROOT, alive, children_of, is_broken, local_worker_pid, wait_until

from zmqexecutor import (
    BrokenWorkerPool,
    RemoteError,
    RemoteTraceback,
    TaskCrashedError,
    WorkerInfo,
    ZMQExecutor,
)
from zmqexecutor._wire import _features


@pytest.fixture(scope="module")
def ex():
    with ZMQExecutor(max_workers=2) as executor:
        yield executor


class CustomError(Exception):
    def __init__(self, code: int, detail: str) -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail


def raise_custom(code: int) -> None:
    raise CustomError(code, "detail text")


class Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("refuses to pickle")


def raise_unpicklable() -> None:
    raise Unpicklable("cannot travel")


def explode_unless_in(pid: int) -> int:
    if os.getpid() != pid:
        raise ValueError(f"rebuilt in pid {os.getpid()}, not {pid}")
    return pid


class OnlyUnpicklesIn:
    """Pickles anywhere; unpickles only in the process that pickled it."""

    def __reduce__(self):
        return (explode_unless_in, (os.getpid(),))


def make_only_unpickles_here() -> OnlyUnpicklesIn:
    return OnlyUnpicklesIn()


class Payload:
    pass


def make_payload() -> Payload:
    return Payload()


INIT = {"value": None, "count": 0}


def remember(value: str) -> None:
    INIT["value"] = value
    INIT["count"] += 1


def init_state() -> tuple:
    return INIT["value"], INIT["count"], os.getpid()


def failing_initializer() -> None:
    raise RuntimeError("initializer exploded")


def slow_identity(x: float) -> float:
    time.sleep(x)
    return x


def _run_script(tmp_path, body: str, **kwargs) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)), **kwargs)


# --- submit ---------------------------------------------------------------------------------------


def test_submit_returns_a_standard_future(ex) -> None:
    future = ex.submit(pow, 2, 10)
    assert type(future) is cf.Future
    assert future.result(timeout=30) == 1024


def test_submit_passes_keyword_arguments_named_fn(ex) -> None:
    assert ex.submit(dict, fn=1, self=2).result(timeout=30) == {"fn": 1, "self": 2}


def test_lambdas_and_closures_from_the_test_module(ex) -> None:
    base = 7
    assert ex.submit(lambda x: x * base, 6).result(timeout=30) == 42

    def make_adder(n):
        return lambda x: x + n

    assert list(ex.map(make_adder(100), [1, 2, 3])) == [101, 102, 103]


def test_tasks_run_in_other_processes(ex) -> None:
    pids = {f.result(timeout=30) for f in [ex.submit(os.getpid) for _ in range(20)]}
    assert os.getpid() not in pids
    assert 1 <= len(pids) <= 2


def test_remote_exception_keeps_type_attributes_and_traceback(ex) -> None:
    future = ex.submit(raise_custom, 7)
    with pytest.raises(CustomError) as info:
        future.result(timeout=30)
    assert info.value.code == 7 and info.value.detail == "detail text"
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    text = str(cause)
    assert "raise_custom" in text and "raise CustomError(code" in text
    assert f"endpoint {ex.endpoints[0]}" in text and "pid " in text and "host " in text


def test_unpicklable_exception_arrives_as_remote_error(ex) -> None:
    with pytest.raises(RemoteError) as info:
        ex.submit(raise_unpicklable).result(timeout=30)
    assert info.value.type_name.endswith("Unpicklable")
    assert info.value.message == "cannot travel"
    assert "raise_unpicklable" in info.value.traceback_text


def test_unpicklable_argument_fails_the_future_not_submit(ex) -> None:
    future = ex.submit(len, threading.Lock())
    assert isinstance(future.exception(timeout=30), TypeError)
    assert ex.submit(len, "abc").result(timeout=30) == 3


def test_unpicklable_result_fails_the_future(ex) -> None:
    error = ex.submit(threading.Lock).exception(timeout=30)
    assert isinstance(error, TypeError) and "pickle" in str(error)
    assert ex.submit(abs, -1).result(timeout=30) == 1


def test_argument_that_fails_to_unpickle_on_the_worker_fails_one_future(ex) -> None:
    error = ex.submit(type, OnlyUnpicklesIn()).exception(timeout=30)
    assert isinstance(error, ValueError) and "rebuilt in pid" in str(error)
    assert ex.submit(abs, -2).result(timeout=30) == 2


def test_result_that_fails_to_unpickle_on_the_client_fails_one_future(ex) -> None:
    error = ex.submit(make_only_unpickles_here).exception(timeout=30)
    assert isinstance(error, ValueError) and "rebuilt in pid" in str(error)
    assert ex.submit(abs, -3).result(timeout=30) == 3


def test_large_numpy_arrays_round_trip_unchanged(ex) -> None:
    array = np.random.default_rng(0).random(4 * 1024 * 1024)  # 32 MiB
    result = ex.submit(np.negative, array).result(timeout=60)
    assert result.shape == array.shape and result.dtype == array.dtype
    assert np.array_equal(result, -array)
    assert result.flags.writeable
    echoed = ex.submit(bytes, memoryview(array).cast("B")).result(timeout=60)
    assert echoed == array.tobytes()


_kept: list = []


def keep_and_sum(array: "np.ndarray") -> tuple[float, float, int]:
    _kept.append(array)  # a task that keeps its argument, in a global of its process
    return float(array.sum()), float(_kept[0].sum()), len(_kept)


@pytest.mark.parametrize("where", ["local", "remote"])
def test_large_messages_reuse_memory_only_when_nobody_holds_it(where: str, start_worker) -> None:
    # Workers read large messages into memory they used before, once nothing refers to it: what a
    # task kept must never be overwritten by the next argument, nor a reply by the next one.
    endpoints = [start_worker(processes=1).endpoint] if where == "remote" else []
    n = 2 << 20  # 16 MiB of float64
    with (ZMQExecutor(endpoints, max_workers=1) if endpoints else ZMQExecutor(max_workers=1)) as ex:
        sums = [ex.submit(keep_and_sum, np.full(n, float(i))).result(timeout=60) for i in (1, 2, 3)]
        arrays = [np.full(n, float(i)) for i in range(4, 10)]
        echoed = [f.result(timeout=60) for f in [ex.submit(np.copy, a) for a in arrays]]
    assert sums == [(1.0 * n, 1.0 * n, 1), (2.0 * n, 1.0 * n, 2), (3.0 * n, 1.0 * n, 3)]
    assert all(np.array_equal(e, a) for e, a in zip(echoed, arrays))


def echo_array(array: "np.ndarray") -> "np.ndarray":
    return array


def double_in_place(array: "np.ndarray") -> "np.ndarray":
    array *= 2
    return array


def keep_and_return(array: "np.ndarray") -> "np.ndarray":
    _kept[:] = [array]
    return array


def change_what_was_kept() -> float:
    _kept[0][:] = -1.0
    return float(_kept[0].sum())


def test_a_remote_task_that_returns_its_argument_gets_it_back_as_it_was_when_it_returned(start_worker) -> None:
    # What the client gets must be what the task returned, however its bytes travel back (a worker
    # reads large messages into memory it used before): changed before it returned, or changed by a
    # later task of the same process while the result may still be on its way.
    n = 2 << 20  # 16 MiB of float64
    with ZMQExecutor([start_worker(processes=1).endpoint], max_workers=1) as ex:
        for i in range(3):
            original = np.random.default_rng(i).random(n)
            assert np.array_equal(ex.submit(echo_array, original).result(timeout=60), original)
            assert np.array_equal(ex.submit(double_in_place, original).result(timeout=60), 2 * original)
            view = ex.submit(operator.itemgetter(slice(1000, None)), original).result(timeout=60)
            assert np.array_equal(view, original[1000:])
            kept, changed = ex.submit(keep_and_return, original), ex.submit(change_what_was_kept)
            assert changed.result(timeout=60) == -1.0 * n
            result = kept.result(timeout=60)
            assert np.array_equal(result, original) and result.flags.writeable


# --- map ------------------------------------------------------------------------------------------


def test_map(ex) -> None:
    assert list(ex.map(pow, range(10), range(10))) == [pow(i, i) for i in range(10)]
    assert list(ex.map(pow, range(10), [2] * 3)) == [0, 1, 4]
    assert list(ex.map(abs, [])) == []


@pytest.mark.parametrize("chunksize", [1, 2, 3, 7, 50])
def test_map_chunksize(ex, chunksize: int) -> None:
    assert list(ex.map(pow, range(20), range(20), chunksize=chunksize)) == [pow(i, i) for i in range(20)]


def test_map_raises_at_the_failing_item(ex) -> None:
    for chunksize in (1, 2):
        results = ex.map(divmod, [1, 1, 1, 1], [2, 3, 0, 5], chunksize=chunksize)
        assert next(results) == (0, 1)
        assert next(results) == (0, 1)
        with pytest.raises(ZeroDivisionError):
            next(results)


def test_map_rejects_bad_chunksize_and_buffersize(ex) -> None:
    with pytest.raises(ValueError, match=r"chunksize must be >= 1\."):
        ex.map(abs, [1], chunksize=0)
    for bad in ("2", 2.0):
        with pytest.raises(TypeError, match="buffersize must be an integer or None"):
            ex.map(abs, [1], buffersize=bad)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=r"buffersize must be None or > 0"):
            ex.map(abs, [1], buffersize=bad)


def test_map_timeout_counts_from_the_call() -> None:
    results = []
    with ZMQExecutor(max_workers=2) as executor:
        list(executor.map(slow_identity, [0, 0]))  # both task processes up
        started = time.monotonic()
        with pytest.raises(cf.TimeoutError):
            for value in executor.map(slow_identity, [0, 0, 3], timeout=1):
                results.append(value)
        assert time.monotonic() - started < 2.5
    assert results == [0, 0]


@pytest.mark.slow  # about 10 s of sleeps; the task process's logic is the same on every Python
def test_results_finished_before_a_long_task_arrive_while_it_runs() -> None:
    # Replies wait in the task process to go back together while more tasks are queued there; a
    # long task queued behind short ones must not hold theirs back until it ends.
    with ZMQExecutor(max_workers=1) as executor:
        executor.submit(slow_identity, 0).result()
        for _ in range(2):
            shorts = [executor.submit(slow_identity, 0.001) for _ in range(20)]
            long = executor.submit(slow_identity, 2.5)
            done, _ = cf.wait(shorts, timeout=1.5)
            assert len(done) == 20 and not long.done()
            assert long.result() == 2.5


def test_map_without_buffersize_collects_the_iterables_at_once(ex) -> None:
    pulled = []

    def source():
        for i in range(10):
            pulled.append(i)
            yield i

    results = ex.map(abs, source())
    assert pulled == list(range(10))  # before the first next()
    assert list(results) == list(range(10))


@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_buffersize_reads_lazily(ex, chunksize: int) -> None:
    pulled = []

    def source():
        for i in itertools.count():
            pulled.append(i)
            yield i

    results = ex.map(abs, source(), buffersize=2, chunksize=chunksize)
    assert len(pulled) == 2 * chunksize
    assert [next(results) for _ in range(10)] == list(range(10))
    assert len(pulled) <= 10 + 3 * chunksize + 1
    results.close()


def test_map_buffersize_with_short_and_multiple_iterables(ex) -> None:
    assert list(ex.map(pow, range(4), range(4), buffersize=10)) == [1, 1, 4, 27]
    assert list(ex.map(str, range(4), buffersize=1)) == ["0", "1", "2", "3"]
    assert list(ex.map(str, iter([]), buffersize=2)) == []


def test_closing_a_map_cancels_what_has_not_started() -> None:
    with ZMQExecutor(max_workers=1) as executor:
        results = executor.map(slow_identity, [0.3] * 10)
        assert next(results) == 0.3
        results.close()
        # Only what was already sent to the worker (slot + prefetch) still runs.
        started = time.monotonic()
    assert time.monotonic() - started < 2.5


# --- the futures API ------------------------------------------------------------------------------


def test_as_completed_and_wait_across_executors(ex) -> None:
    # Both task processes started and imported this module: the race below is not against start-up.
    assert list(ex.map(slow_identity, [0.1, 0.1], timeout=30)) == [0.1, 0.1]
    with cf.ThreadPoolExecutor(1) as threads:
        ours = [ex.submit(slow_identity, d) for d in (0.4, 0.0)]
        theirs = threads.submit(slow_identity, 0.2)
        order = [f.result() for f in cf.as_completed([*ours, theirs], timeout=30)]
        assert sorted(order) == [0.0, 0.2, 0.4]
        assert order[0] == 0.0
        done, not_done = cf.wait([*ours, theirs], timeout=30)
        assert len(done) == 3 and not not_done
        first = ex.submit(slow_identity, 1.0)
        quick = ex.submit(abs, -1)
        done, _ = cf.wait([first, quick], timeout=30, return_when=cf.FIRST_COMPLETED)
        assert quick in done


def test_asyncio_interop(ex) -> None:
    async def main():
        loop = asyncio.get_running_loop()
        a = await loop.run_in_executor(ex, pow, 3, 4)
        b = await asyncio.wrap_future(ex.submit(abs, -5))
        c = await asyncio.gather(*(loop.run_in_executor(ex, abs, -i) for i in range(5)))
        return a, b, c

    assert asyncio.run(main()) == (81, 5, [0, 1, 2, 3, 4])


def test_done_callbacks_run_once(ex) -> None:
    calls = []
    done = threading.Event()
    future = ex.submit(abs, -9)
    future.add_done_callback(lambda f: (calls.append(f.result()), done.set()))
    assert done.wait(30)
    time.sleep(0.1)
    assert calls == [9]


def exit_in_task(how: str) -> None:
    if how == "exit":
        sys.exit(3)
    raise KeyboardInterrupt


@pytest.mark.parametrize("how, error", [("exit", SystemExit), ("interrupt", KeyboardInterrupt)])
def test_sys_exit_or_keyboardinterrupt_in_a_task_fails_its_future_as_in_the_stdlib(ex, how, error) -> None:
    # ProcessPoolExecutor hands these to the caller too: result() raises them, and the pool goes on.
    pids = {ex.submit(os.getpid).result(timeout=30) for _ in range(4)}
    with pytest.raises(error):
        ex.submit(exit_in_task, how).result(timeout=30)
    assert ex.submit(abs, -1).result(timeout=30) == 1
    assert {ex.submit(os.getpid).result(timeout=30) for _ in range(4)} <= pids  # no process died


def test_done_callbacks_that_raise_or_submit_do_not_disturb_the_executor(ex, caplog) -> None:
    follow_ups: list = []
    results = []

    def boom(future) -> None:
        raise RuntimeError("a callback that raises")

    def submit_more(future) -> None:
        follow_ups.append(ex.submit(abs, -future.result()))

    futures = [ex.submit(abs, -i) for i in range(50)]
    for future in futures:
        future.add_done_callback(boom)
        future.add_done_callback(submit_more)
    assert [f.result(timeout=30) for f in futures] == list(range(50))
    assert wait_until(lambda: len(follow_ups) == 50, 30)
    results = sorted(f.result(timeout=30) for f in follow_ups)
    assert results == list(range(50))
    assert "a callback that raises" in caplog.text  # the stdlib logs it, as for any Future
    assert ex.submit(abs, -5).result(timeout=30) == 5


def test_32_threads_submitting_at_once_each_get_their_own_results(ex) -> None:
    start = threading.Barrier(32)
    outcomes: dict[int, list] = {}

    def submitter(n: int) -> None:
        start.wait(10)
        futures = [ex.submit(pid_and, n * 1000 + i) for i in range(100)]
        outcomes[n] = [f.result(timeout=60)[1] for f in futures]

    threads = [threading.Thread(target=submitter, args=(n,)) for n in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert all(outcomes[n] == [n * 1000 + i for i in range(100)] for n in range(32)), sorted(outcomes)


@pytest.mark.slow  # tracemalloc makes its 100,000 submits take 10 s; a Future is pure Python on every version
def test_100000_pending_futures_cost_the_client_little_memory() -> None:
    import tracemalloc

    with ZMQExecutor(max_workers=2) as executor:
        blockers = [executor.submit(time.sleep, 3) for _ in range(2)]
        assert wait_until(lambda: all(b.running() for b in blockers), 30)
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        pending = [executor.submit(abs, -i) for i in range(100_000)]
        time.sleep(0.5)  # the I/O thread has them in its backlog now
        per_task = (tracemalloc.get_traced_memory()[0] - before) / len(pending)
        tracemalloc.stop()
        # A Future (~1 KiB with its condition and lock), the call's pickle and the queue entry.
        assert per_task < 4096, per_task  # about 1.9 KB here
        for future in pending:
            future.cancel()
        assert [f.result(timeout=30) for f in blockers] == [None, None]


def test_a_pending_future_can_be_cancelled() -> None:
    with ZMQExecutor(max_workers=1) as executor:
        running = [executor.submit(slow_identity, 0.5) for _ in range(2)]  # the slot and its prefetch
        waiting = executor.submit(slow_identity, 0.5)
        assert wait_until(lambda: running[1].running())
        assert waiting.cancel()
        assert waiting.cancelled()
        assert not running[0].cancel()
        assert [f.result(timeout=30) for f in running] == [0.5, 0.5]


def test_no_references_kept_to_arguments_or_results(ex) -> None:
    argument = Payload()
    argument_ref = weakref.ref(argument)
    future = ex.submit(type, argument)
    del argument
    gc.collect()
    assert argument_ref() is None
    assert future.result(timeout=30) is Payload or future.result().__name__ == "Payload"

    future = ex.submit(make_payload)
    result_ref = weakref.ref(future.result(timeout=30))
    del future
    gc.collect()
    assert result_ref() is None


# --- shutdown -------------------------------------------------------------------------------------


def test_submit_and_map_after_shutdown_raise_the_stdlib_error() -> None:
    executor = ZMQExecutor(max_workers=1)
    executor.shutdown()
    with pytest.raises(RuntimeError, match="^cannot schedule new futures after shutdown$"):
        executor.submit(abs, 1)
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        executor.map(abs, [1])
    executor.shutdown()  # again: harmless


def test_shutdown_waits_for_everything_submitted() -> None:
    executor = ZMQExecutor(max_workers=2)
    futures = [executor.submit(slow_identity, 0.1) for _ in range(8)]
    executor.shutdown(wait=True)
    assert all(f.done() and f.result() == 0.1 for f in futures)


def test_shutdown_cancel_futures_cancels_only_what_has_not_started() -> None:
    executor = ZMQExecutor(max_workers=1)
    futures = [executor.submit(slow_identity, 0.3) for _ in range(10)]
    assert wait_until(lambda: futures[0].running())
    executor.shutdown(wait=True, cancel_futures=True)
    assert all(f.done() for f in futures)
    cancelled = [f for f in futures if f.cancelled()]
    finished = [f for f in futures if not f.cancelled()]
    assert len(cancelled) >= 5
    assert finished and all(f.result() == 0.3 for f in finished)


def test_shutdown_without_wait_returns_at_once_and_still_finishes() -> None:
    executor = ZMQExecutor(max_workers=1)
    worker_pid = local_worker_pid(executor)
    futures = [executor.submit(slow_identity, 0.3) for _ in range(3)]
    started = time.monotonic()
    executor.shutdown(wait=False)
    assert time.monotonic() - started < 0.2
    assert [f.result(timeout=30) for f in futures] == [0.3] * 3
    assert wait_until(lambda: not alive(worker_pid), timeout=15)


def test_shutdown_leaves_no_process_or_thread_behind() -> None:
    before = children_of(os.getpid())
    threads_before = set(threading.enumerate())
    with ZMQExecutor(max_workers=3) as executor:
        assert executor.submit(abs, -1).result(timeout=30) == 1
        assert wait_until(lambda: len(children_of(os.getpid()) - before) >= 4)
    assert children_of(os.getpid()) - before == set()
    assert set(threading.enumerate()) - threads_before == set()


def test_a_forgotten_executor_is_collected_and_its_workers_stop() -> None:
    threads_before = set(threading.enumerate())
    executor = ZMQExecutor(max_workers=1)
    worker_pid = local_worker_pid(executor)
    (engine,) = [t for t in set(threading.enumerate()) - threads_before if t.name == "zmqexecutor-io"]
    executor_ref = weakref.ref(executor)
    future = executor.submit(slow_identity, 0.2)
    del executor
    gc.collect()
    assert executor_ref() is None
    assert future.result(timeout=30) == 0.2
    engine.join(30)
    assert not engine.is_alive()
    assert wait_until(lambda: not alive(worker_pid), timeout=15)


def test_a_script_that_never_shuts_down_finishes_its_work_at_exit(tmp_path) -> None:
    out = _run_script(tmp_path, """
        import os, time
        from zmqexecutor import ZMQExecutor

        def slow_square(x):
            time.sleep(0.2)
            return x * x

        executor = ZMQExecutor(max_workers=2)
        executor.submit(abs, 1).result(timeout=30)
        print("worker", executor.workers()[0].pid, flush=True)
        futures = [executor.submit(slow_square, i) for i in range(4)]
        futures[-1].add_done_callback(lambda f: print("last", f.result(), flush=True))
    """)
    assert out.returncode == 0, out.stderr
    assert "last 9" in out.stdout
    worker_pid = int(out.stdout.split()[1])
    assert wait_until(lambda: not alive(worker_pid), timeout=10)


def test_functions_defined_in_a_scripts_main_module(tmp_path) -> None:
    out = _run_script(tmp_path, """
        from zmqexecutor import ZMQExecutor

        class Point:
            def __init__(self, x, y):
                self.x, self.y = x, y

        def norm2(p):
            return p.x * p.x + p.y * p.y

        with ZMQExecutor(max_workers=2) as ex:
            print(sum(ex.map(norm2, [Point(i, i) for i in range(10)])))
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(sum(2 * i * i for i in range(10)))


# --- initializer, max_tasks_per_child, crashes ----------------------------------------------------


def test_initializer_runs_once_in_each_task_process() -> None:
    with ZMQExecutor(max_workers=2, initializer=remember, initargs=("hello",)) as executor:
        states = [f.result(timeout=30) for f in [executor.submit(init_state) for _ in range(20)]]
    assert {(value, count) for value, count, _ in states} == {("hello", 1)}


_MAIN_GLOBALS_SCRIPT = """
import os, sys
from zmqexecutor import ZMQExecutor

conn = None
N = 1
counter = 0

def init(value):
    global conn
    conn = f"connection-{value}"

def task():
    return conn

def helper():
    return conn

def uses_helper():
    return helper(), N

def bump():
    global counter
    counter += 1
    return os.getpid(), counter

with ZMQExecutor(sys.argv[1:] or None, max_workers=2, initializer=init, initargs=("hello",)) as ex:
    print(sorted(set(ex.map(lambda _: task(), range(8)))))
    print(sorted(set(ex.map(lambda _: task(), range(20), chunksize=5))))
    print(ex.submit(uses_helper).result())
    N = 2  # a global rebound in the script reaches the tasks
    print(ex.submit(uses_helper).result())
    def helper():  # and so does a function redefined, as in a notebook
        return "redefined"
    print(ex.submit(uses_helper).result())
    runs = {}
    for pid, count in [ex.submit(bump).result() for _ in range(6)]:
        runs.setdefault(pid, []).append(count)
    print(all(counts == list(range(1, len(counts) + 1)) for counts in runs.values()))
"""


@pytest.mark.parametrize("where", ["local", "remote"])
def test_an_initializer_in_the_script_sets_globals_its_tasks_see(where: str, tmp_path, start_worker) -> None:
    # The ProcessPoolExecutor habit: the initializer opens a connection into a global of the script.
    args = [start_worker(processes=2).endpoint] if where == "remote" else []
    script = tmp_path / "script.py"
    script.write_text(_MAIN_GLOBALS_SCRIPT)
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "['connection-hello']",
        "['connection-hello']",
        "('connection-hello', 1)",
        "('connection-hello', 2)",
        "('redefined', 2)",
        "True",  # each task process counts on from its own last value, as a module global would
    ]


_MUTATED_GLOBALS_SCRIPT = """
import os, sys
from zmqexecutor import ZMQExecutor

STATE = {}
SEEN = []
class Box:
    pass
BOX = Box()
_cache = {}
LOADS = sys.argv[1]

def init(tag):  # fills globals in place, the usual way to keep a connection or a model
    STATE["tag"] = tag
    SEEN.append(tag)
    BOX.tag = tag

def read(_):
    return STATE.get("tag"), tuple(SEEN), getattr(BOX, "tag", None)

def remember(value):
    STATE.setdefault("remembered", []).append(value)
    return os.getpid(), value

def recall(_):
    return os.getpid(), STATE.get("remembered", [])

def load():
    open(os.path.join(LOADS, f"{os.getpid()}-{len(os.listdir(LOADS))}"), "x").close()
    return "model"

def predict(_):
    if "m" not in _cache:
        _cache["m"] = load()
    return os.getpid(), _cache["m"]

with ZMQExecutor(sys.argv[2:] or None, max_workers=2, initializer=init, initargs=("hello",)) as ex:
    print(set(ex.map(read, range(6))))
    remembered = {}
    for pid, value in ex.map(remember, range(10)):
        remembered.setdefault(pid, []).append(value)
    print(all(remembered[pid] == values for pid, values in ex.map(recall, range(10))))
    pids = {pid for pid, _ in ex.map(predict, range(40))}
    loads = [name.split("-")[0] for name in os.listdir(LOADS)]
    print(sorted(loads) == sorted(str(pid) for pid in set(loads)) and set(loads) >= {str(p) for p in pids})
    STATE["tag"] = "from the client"  # the client's own change arrives
    print(set(ex.map(read, range(6))))
"""


@pytest.mark.parametrize("where", ["local", "remote"])
def test_globals_an_initializer_or_a_task_fills_in_place_stay_filled(where: str, tmp_path, start_worker) -> None:
    args = [start_worker(processes=2).endpoint] if where == "remote" else []
    loads = tmp_path / "loads"
    loads.mkdir()
    script = tmp_path / "script.py"
    script.write_text(_MUTATED_GLOBALS_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(loads), *args], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "{('hello', ('hello',), 'hello')}",  # ProcessPoolExecutor's answer; each read brought STATE = {} anew
        "True",  # each process recalls what its own earlier tasks remembered
        "True",  # the lazy cache loaded once per process
        "{('from the client', ('hello',), 'hello')}",
    ]


def test_a_failing_initializer_breaks_the_executor() -> None:
    executor = ZMQExecutor(max_workers=1, initializer=failing_initializer)
    try:
        error = executor.submit(abs, 1).exception(timeout=30)
        assert isinstance(error, BrokenWorkerPool)
        assert isinstance(error, BrokenProcessPool) and isinstance(error, cf.BrokenExecutor)
        assert isinstance(error.__cause__, RuntimeError) and "initializer exploded" in str(error.__cause__)
        assert wait_until(lambda: is_broken(executor))
        with pytest.raises(BrokenWorkerPool):
            executor.submit(abs, 1)
    finally:
        executor.shutdown()


def test_max_tasks_per_child_recycles_task_processes() -> None:
    with ZMQExecutor(max_workers=1, max_tasks_per_child=2) as executor:
        pids = [executor.submit(os.getpid).result(timeout=30) for _ in range(6)]
    assert len(set(pids)) == 3
    assert all(pids.count(pid) == 2 for pid in set(pids))


def pid_and(x: int) -> tuple[int, int]:
    return os.getpid(), x


@pytest.mark.slow  # scheduling, the same on every Python
def test_max_tasks_per_child_holds_for_tiny_tasks_sent_many_at_a_time() -> None:
    with ZMQExecutor(max_workers=2, max_tasks_per_child=7) as executor:
        results = list(executor.map(pid_and, range(120)))  # each process started costs 0.3 s here
        assert executor.workers()[0].completed >= 120
    assert [x for _, x in results] == list(range(120))
    per_process = collections.Counter(pid for pid, _ in results)
    assert max(per_process.values()) <= 7 and len(per_process) >= 120 // 7


def exit_at(x: int, fatal: int) -> int:
    if x == fatal:
        os._exit(9)
    return x


def test_a_crash_amid_tiny_tasks_fails_only_the_task_that_crashed() -> None:
    with ZMQExecutor(max_workers=1) as executor:
        # Short tasks: the executor learns it and keeps many queued in the task process at a time.
        assert list(executor.map(abs, range(3000))) == list(range(3000))
        futures = [executor.submit(exit_at, i, 500) for i in range(1000)]
        errors = [f.exception(timeout=60) for f in futures]
        assert [i for i, e in enumerate(errors) if e is not None] == [500]
        assert isinstance(errors[500], TaskCrashedError) and "exited with code 9" in str(errors[500])
        # Those queued behind it never started and ran on its replacement; those it finished lost only
        # their replies and ran again; none failed.
        assert all(f.result() == i for i, f in enumerate(futures) if i != 500)
        (info,) = executor.workers()
        assert info.state == "ready" and info.lost == 0


def test_a_task_that_kills_its_process_fails_only_its_future() -> None:
    with ZMQExecutor(max_workers=2) as executor:
        slow = executor.submit(slow_identity, 1.0)
        crashed = executor.submit(os._exit, 3)
        error = crashed.exception(timeout=30)
        assert isinstance(error, TaskCrashedError) and isinstance(error, BrokenProcessPool)
        assert error.exitcode == 3 and "exited with code 3" in str(error)
        assert slow.result(timeout=30) == 1.0
        assert list(executor.map(abs, [-1, -2, -3])) == [1, 2, 3]


# --- construction ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"max_workers": 0}, ValueError, "max_workers must be greater than 0"),
        ({"max_workers": -1}, ValueError, "max_workers must be greater than 0"),
        ({"max_workers": "2"}, TypeError, "max_workers must be an integer"),
        ({"max_tasks_per_child": 0}, ValueError, "max_tasks_per_child must be >= 1"),
        ({"max_tasks_per_child": 1.5}, TypeError, "max_tasks_per_child must be an integer"),
        ({"initializer": 3}, TypeError, "initializer must be a callable"),
        ({"connect_timeout": 0}, ValueError, "connect_timeout must be > 0 or None"),
        ({"endpoints": "localhost:5555"}, ValueError, "malformed endpoint 'localhost:5555'"),
        ({"endpoints": ["tcp://a:1", "udp://b:2"]}, ValueError, "unsupported transport in endpoint 'udp://b:2'"),
        ({"endpoints": ["tcp://a:99999"]}, ValueError, "malformed port in endpoint 'tcp://a:99999'"),
        ({"endpoints": ["tcp://*:1"]}, ValueError, "wildcard"),
        ({"endpoints": []}, ValueError, "endpoints must not be empty"),
        ({"endpoints": ["tcp://a:1", "tcp://a:1"]}, ValueError, "duplicate endpoints: tcp://a:1"),
        ({"endpoints": [5555]}, TypeError, "an endpoint must be a string"),
        ({"endpoints": 2, "max_workers": 3}, TypeError, r"ZMQExecutor\(2, 3\): a number as the first argument is max_workers"),
        ({"endpoints": 0}, ValueError, "max_workers must be greater than 0"),
        ({"endpoints": 2.5}, TypeError, "endpoints must be a string, a list of strings or None, not float"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs: dict, error: type, message: str) -> None:
    before = children_of(os.getpid())
    with pytest.raises(error, match=message):
        ZMQExecutor(**kwargs)
    assert children_of(os.getpid()) - before == set()


def test_a_number_first_means_max_workers_as_for_process_pool_executor() -> None:
    with ZMQExecutor(2) as executor:  # ProcessPoolExecutor(2)
        assert executor.endpoints[0].startswith("ipc://")
        assert list(executor.map(abs, [-1, -2])) == [1, 2]
        assert executor.workers()[0].slots == 2


def test_an_unpicklable_initializer_is_an_error_at_construction() -> None:
    lock = threading.Lock()
    with pytest.raises(TypeError):
        ZMQExecutor(max_workers=1, initializer=lambda: lock)


# --- the local worker's life ----------------------------------------------------------------------


def _kill_local_worker(executor: ZMQExecutor) -> int:
    pid = local_worker_pid(executor)
    os.kill(pid, signal.SIGKILL)
    return pid


def _worker_folders() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "zmqexecutor-worker-*")))


@pytest.mark.slow  # the supervisor's restart logic, the same on every Python
def test_a_dead_local_worker_is_started_again_and_its_task_retried(caplog) -> None:
    folders = _worker_folders()
    with ZMQExecutor(max_workers=1) as executor:
        assert executor.submit(abs, -1).result(timeout=30) == 1
        pending = executor.submit(slow_identity, 1.5)
        time.sleep(0.3)  # running in the worker
        old = _kill_local_worker(executor)
        assert pending.result(timeout=30) == 1.5
        assert executor.workers()[0].pid != old and not alive(old)
        (info,) = executor.workers()
        assert info.state == "ready" and info.lost == 1
        assert executor.submit(abs, -2).result(timeout=30) == 2
    assert "exited unexpectedly with code -9; starting it again" in caplog.text
    # The killed worker had no folder of its own to leave behind: its sockets live in the executor's.
    assert _worker_folders() <= folders


@pytest.mark.slow  # the supervisor's restart logic, the same on every Python
def test_a_local_worker_that_keeps_dying_breaks_the_executor_with_a_clear_error() -> None:
    executor = ZMQExecutor(max_workers=1)
    try:
        assert executor.submit(abs, -1).result(timeout=30) == 1
        for _ in range(3):
            old = _kill_local_worker(executor)
            assert wait_until(lambda: executor.workers()[0].pid not in (None, old), timeout=15)
        pending = executor.submit(slow_identity, 10)
        _kill_local_worker(executor)
        error = pending.exception(timeout=15)
        assert isinstance(error, BrokenWorkerPool), error
        assert "local worker process" in str(error) and "(4 times in 60 s)" in str(error)
        with pytest.raises(BrokenWorkerPool):
            executor.submit(abs, 1)
    finally:
        executor.shutdown()


def test_a_local_worker_that_cannot_start_is_not_started_again(monkeypatch, caplog) -> None:
    monkeypatch.setattr(sys, "executable", shutil.which("false"))
    executor = ZMQExecutor(max_workers=1)
    try:
        try:
            error = executor.submit(abs, 1).exception(timeout=15)
        except BrokenWorkerPool as exc:  # it may have broken already, before this submit
            error = exc
        assert isinstance(error, BrokenWorkerPool) and "exited unexpectedly with code 1;" in str(error)
    finally:
        executor.shutdown()
    assert "starting it again" not in caplog.text


def fork_a_child_that_prints() -> int:
    import multiprocessing

    child = multiprocessing.get_context("fork").Process(target=print, args=("from a forked child",))
    child.start()
    child.join(20)
    return child.exitcode


def test_a_task_may_fork_a_child_that_prints() -> None:
    with ZMQExecutor(max_workers=1) as executor:
        assert [f.result(timeout=60) for f in [executor.submit(fork_a_child_that_prints) for _ in range(5)]] == [0] * 5


def test_local_workers_exit_when_the_client_is_killed(tmp_path) -> None:
    out = _run_script(tmp_path, """
        import os, signal
        from zmqexecutor import ZMQExecutor
        ex = ZMQExecutor(max_workers=2)
        ex.submit(abs, 1).result(timeout=30)
        print(ex.workers()[0].pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert out.returncode == -9
    supervisor = int(out.stdout.split()[0])
    assert wait_until(lambda: not alive(supervisor), timeout=10)


def test_ctrl_c_in_the_terminal_leaves_the_local_workers_running(tmp_path) -> None:
    out = _run_script(tmp_path, """
        import os, signal, time
        from zmqexecutor import ZMQExecutor
        with ZMQExecutor(max_workers=1) as ex:
            ex.submit(abs, 1).result(timeout=30)
            try:
                os.killpg(os.getpgrp(), signal.SIGINT)  # what the terminal does on Ctrl-C
                time.sleep(5)
            except KeyboardInterrupt:
                print("interrupted", flush=True)
            print("after", ex.submit(abs, -42).result(timeout=30), flush=True)
    """, start_new_session=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["interrupted", "after", "42"]


def noisy(x: int) -> int:
    print("printed", x)
    print("to stderr", x, file=sys.stderr)
    import logging

    logging.getLogger("user.code").warning("logged %d", x)
    return x


def chatty(n: int) -> int:
    print("x" * n)
    return n


def print_then_wait_for(path: str) -> str:
    print("started")
    print("a line not yet finished: ", end="")
    deadline = time.monotonic() + 30
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    print("finished")
    return "done"


def test_a_running_tasks_output_reaches_the_client_while_it_runs(caplog, tmp_path) -> None:
    caplog.set_level("INFO", logger="zmqexecutor.task")
    release = tmp_path / "release"

    def forwarded() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "zmqexecutor.task"]

    with ZMQExecutor(max_workers=1, task_output="log") as executor:
        future = executor.submit(print_then_wait_for, str(release))
        assert wait_until(lambda: any("started" in m for m in forwarded()), timeout=20)
        assert not future.done()
        early = forwarded()
        release.touch()
        assert future.result(timeout=30) == "done"
    # Only whole lines go early; the unfinished one waits for its end, and nothing comes twice.
    assert len(early) == 1 and early[0].endswith("] started")
    rest = forwarded()[1:]
    assert len(rest) == 1 and rest[0].endswith("] a line not yet finished: finished")


def test_task_output_can_go_to_the_client_log_instead(caplog, capsys) -> None:
    caplog.set_level("INFO", logger="zmqexecutor.task")
    with ZMQExecutor(max_workers=1, task_output="log") as executor:
        assert executor.submit(noisy, 7).result(timeout=30) == 7
        endpoint = executor.endpoints[0]
        assert executor.submit(chatty, 200_000).result(timeout=30) == 200_000
    records = [r.getMessage() for r in caplog.records if r.name == "zmqexecutor.task"]
    stdout = next(m for m in records if "stdout" in m and "printed" in m)
    stderr = next(m for m in records if "stderr" in m and "to stderr 7" in m)
    assert f"[{endpoint} pid " in stdout and stdout.endswith("printed 7")
    assert "logged 7" in stderr
    assert any("stdout (truncated)" in m for m in records)
    assert "printed 7" not in capsys.readouterr().out


_CHATTY_SCRIPT = '''
    import os, sys
    from zmqexecutor import ZMQExecutor

    def chatty(x):
        print(f"hello {x}")
        print(f"oops {x}", file=sys.stderr)
        return os.getpid()

    with ZMQExecutor(%s) as ex:
        pid = ex.submit(chatty, 1).result()
    print("pid", pid)
'''


def test_what_a_task_prints_reaches_the_scripts_own_stdout_once_tagged_with_its_process(tmp_path) -> None:
    out = _run_script(tmp_path, _CHATTY_SCRIPT % "max_workers=1")
    assert out.returncode == 0, out.stderr
    pid = out.stdout.rsplit("pid ", 1)[1].strip()
    assert out.stdout.count("hello 1") == 1 and f"(pid={pid}) hello 1\n" in out.stdout
    assert out.stderr.count("oops 1") == 1 and f"(pid={pid}) oops 1\n" in out.stderr


def test_what_a_remote_task_prints_reaches_the_client_tagged_with_its_host(tmp_path, start_worker) -> None:
    worker = start_worker(processes=1)
    out = _run_script(tmp_path, _CHATTY_SCRIPT % repr(worker.endpoint))
    assert out.returncode == 0, out.stderr
    pid = out.stdout.rsplit("pid ", 1)[1].strip()
    assert f"(pid={pid}, host={socket.gethostname()}) hello 1\n" in out.stdout
    assert f"(pid={pid}, host={socket.gethostname()}) oops 1\n" in out.stderr
    assert "oops 1" in worker.log()  # and, as before, in the worker's own log (its stderr)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_client_killed_by_a_signal_leaves_no_private_folder_behind(signum: int, tmp_path) -> None:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent("""
        import time
        from zmqexecutor import ZMQExecutor

        ex = ZMQExecutor(max_workers=1)
        assert ex.submit(abs, -1).result() == 1
        print(ex.endpoints[0], flush=True)
        time.sleep(60)
    """))
    client = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert client.stdout is not None
        folder = os.path.dirname(client.stdout.readline().strip().partition("://")[2])
        assert os.path.isdir(folder)
        client.send_signal(signum)
        client.wait(10)
    finally:
        client.kill()
    # No atexit runs on these signals; the local worker notices its parent is gone and cleans up.
    assert wait_until(lambda: not os.path.exists(folder), timeout=15), os.listdir(folder)



class ExitAtUnpickle:
    """CPython's test_exit_during_result_unpickle_in_result_handler: unpickling this exits."""

    def __init__(self, exit_with: type) -> None:
        self.exit_with = exit_with

    def __reduce__(self) -> tuple:
        return _raise, (self.exit_with,)


def _raise(exc_type: type) -> None:
    raise exc_type()


@pytest.mark.parametrize("exit_with", [SystemExit, KeyboardInterrupt])
def test_a_result_that_exits_while_unpickled_fails_one_future_only(exit_with: type) -> None:
    with ZMQExecutor(max_workers=1) as executor:
        error = executor.submit(ExitAtUnpickle, exit_with).exception(timeout=30)
        assert error is not None and not isinstance(error, (SystemExit, KeyboardInterrupt))
        assert "could not be decoded" in str(error) and exit_with.__name__ in str(error)
        assert executor.submit(abs, -4).result(timeout=30) == 4  # the executor keeps working
        assert not is_broken(executor)


def test_a_forked_child_cannot_use_its_parents_executor_and_says_so(tmp_path) -> None:
    out = _run_script(tmp_path, """
        import os
        from zmqexecutor import ZMQExecutor

        with ZMQExecutor(max_workers=1) as ex:
            assert ex.submit(abs, -1).result() == 1
            pid = os.fork()
            if pid == 0:
                try:
                    ex.submit(abs, -2)
                except RuntimeError as exc:
                    print("child:", exc, flush=True)
                os._exit(0)
            os.waitpid(pid, 0)
            print("parent:", ex.submit(abs, -3).result())
    """)
    assert out.returncode == 0, out.stderr
    child, parent = out.stdout.splitlines()
    assert child.startswith("child: this executor belongs to process ") and "create a new one here" in child
    assert parent == "parent: 3"


def test_the_embedded_default_counts_cpus_as_a_worker_does(tmp_path) -> None:
    worker = subprocess.Popen([sys.executable, "-m", "zmqexecutor", "worker", "--bind", f"ipc://{tmp_path}/w"],
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert worker.stderr is not None
        ready = next(line for line in worker.stderr if "worker ready" in line)
    finally:
        worker.terminate()
        worker.wait(15)
    processes = int(re.search(r"processes=(\d+)", ready).group(1))
    with ZMQExecutor() as executor:
        assert executor.submit(abs, -1).result(timeout=30) == 1
        assert executor.workers()[0].slots == processes


def test_workers_can_be_read_in_a_done_callback_and_after_shutdown() -> None:
    seen: list[tuple[WorkerInfo, ...]] = []
    with ZMQExecutor(max_workers=1) as executor:
        futures = [executor.submit(abs, -i) for i in range(5)]
        for future in futures:  # whichever thread runs it: the I/O thread, a reader, or this one
            future.add_done_callback(lambda _: seen.append(executor.workers()))
        assert [f.result(timeout=30) for f in futures] == [0, 1, 2, 3, 4]
        assert wait_until(lambda: len(seen) == 5)
        assert executor.workers()[0].completed == 5
    assert all(infos[0].state == "ready" for infos in seen)
    [after] = executor.workers()  # what the I/O thread published as it stopped
    assert (after.completed, after.in_flight) == (5, 0)


class Rebuilt:
    """Counts how often it is pickled (in the client) and unpickled (per task process)."""

    pickled = 0
    unpickled = 0

    def __init__(self, data: Any) -> None:
        self.data = data

    def __reduce__(self) -> tuple[Any, ...]:
        Rebuilt.pickled += 1
        return (_rebuild, (self.data,))


def _rebuild(data: Any) -> Rebuilt:
    Rebuilt.unpickled += 1
    return Rebuilt(data)


def decoded_and_first(marker: Rebuilt, x: int) -> tuple[int, float]:
    return Rebuilt.unpickled, float(marker.data[0]) + x


def test_a_maps_callable_is_pickled_once_and_each_process_decodes_it_once() -> None:
    data = np.zeros(1_000_000)  # 8 MB inside the callable: out-of-band, named by its content
    marker = Rebuilt(data)
    with ZMQExecutor(max_workers=2) as executor:
        before = Rebuilt.pickled
        results = list(executor.map(functools.partial(decoded_and_first, marker), range(30)))
        assert Rebuilt.pickled - before == 1
        assert [value for _, value in results] == [float(x) for x in range(30)]
        assert {decoded for decoded, _ in results} == {1}  # in each process, for every task of the map
        data[0] = 100.0  # changed in place between two maps: the next one sees it
        again = list(executor.map(functools.partial(decoded_and_first, marker), range(3)))
        assert [value for _, value in again] == [100.0, 101.0, 102.0]


def first_plus_value(array: Any, x: int) -> float:
    return float(array[0]) + x


def test_a_local_process_that_let_a_callable_go_gets_it_whole_again() -> None:
    arrays = [np.full(10_000, float(i)) for i in range(300)]  # 80 KB each: out-of-band, named by content
    with ZMQExecutor(max_workers=1) as executor:
        assert executor.submit(functools.partial(first_plus_value, arrays[0]), 1).result(timeout=30) == 1.0
        # More callables than a task process keeps (256): the first is let go there...
        futures = [executor.submit(functools.partial(first_plus_value, a), 0) for a in arrays[1:]]
        assert [f.result(timeout=60) for f in futures] == [float(i) for i in range(1, 300)]
        # ...and named by its key alone it is missing: sent again whole, and it runs.
        assert executor.submit(functools.partial(first_plus_value, arrays[0]), 2).result(timeout=30) == 2.0


def test_with_send_once_off_local_processes_get_a_callables_buffers_with_every_task() -> None:
    data = np.full(100_000, 3.0)
    with ZMQExecutor(max_workers=2, send_once=False) as executor:
        for _ in range(2):
            assert list(executor.map(functools.partial(first_plus_value, data), range(10))) == \
                [3.0 + x for x in range(10)]
        data[0] = 7.0
        assert list(executor.map(functools.partial(first_plus_value, data), range(3))) == [7.0, 8.0, 9.0]


def maps_a_kept_buffer(array: Any, x: int) -> tuple[float, bool]:
    with open("/proc/self/maps") as maps:
        return float(array[0]) + x, "/memfd:zx-" in maps.read()


@pytest.mark.skipif(not _features.MEMFD, reason="kept buffers go as copies without memfd_create and /proc")
@pytest.mark.parametrize("cache_size, mapped", [(None, True), ("4MiB", False), (0, False)])
def test_cache_size_bounds_what_local_processes_map_from_the_executor(cache_size, mapped) -> None:
    data = np.full(1 << 20, 2.0)  # 8 MiB, an argument that comes again with every task
    options = {} if cache_size is None else {"cache_size": cache_size}
    with ZMQExecutor(max_workers=2, **options) as executor:
        results = list(executor.map(maps_a_kept_buffer, [data] * 12, range(12)))
        assert [value for value, _ in results] == [2.0 + x for x in range(12)]
        assert any(found for _, found in results) == mapped
    with pytest.raises(ValueError, match="zmqexecutor worker --cache-size SIZE"):
        ZMQExecutor(["tcp://127.0.0.1:5555"], cache_size="1GiB")


def test_a_shared_object_is_pickled_once_and_decoded_once_per_task_process() -> None:
    with ZMQExecutor(max_workers=2) as executor:
        before = Rebuilt.pickled
        shared = executor.share(Rebuilt({"rows": list(range(200_000)), "first": 4.0}))
        assert Rebuilt.pickled == before + 1 and shared.nbytes > 500_000
        results = list(executor.map(decoded_first_of, [shared] * 30, range(30)))
        assert Rebuilt.pickled == before + 1  # the handle carries the pickle; nothing is pickled again
        assert [value for _, value in results] == [4.0 + x for x in range(30)]
        assert {decoded for decoded, _ in results} == {1}
        assert "Shared Rebuilt" in repr(shared) and shared.value.data["first"] == 4.0


def decoded_first_of(marker: Rebuilt, x: int) -> tuple[int, float]:
    return Rebuilt.unpickled, float(marker.data["first"]) + x


@pytest.mark.parametrize("remote", [False, True])
def test_a_callables_array_reaches_every_new_process_under_max_tasks_per_child(remote, start_worker) -> None:
    data = np.full(200_000, 5.0)
    endpoints = start_worker(processes=2).endpoint if remote else None
    with ZMQExecutor(endpoints, max_workers=2, max_tasks_per_child=2) as executor:
        assert list(executor.map(functools.partial(first_plus_value, data), range(12))) == \
            [5.0 + x for x in range(12)]
        assert list(executor.map(first_plus_value, [data] * 6, range(6))) == [5.0 + x for x in range(6)]


def mapped_first_then_changed(array: Any, x: int) -> tuple[bool, float]:
    with open("/proc/self/maps") as maps:
        mapped = "memfd:zx-" in maps.read()
    first = float(array[0])
    array[:] = -1.0  # its own copy-on-write pages: no other task sees this
    return mapped, first + x


@pytest.mark.skipif(not _features.MEMFD, reason="no memfd here: each task gets its own copy")
def test_local_processes_map_one_copy_of_an_argument_a_map_repeats_and_write_only_their_own() -> None:
    data = np.ones(1_000_000)
    with ZMQExecutor(max_workers=2) as executor:
        results = list(executor.map(mapped_first_then_changed, [data] * 12, range(12)))
        assert [value for _, value in results] == [1.0 + x for x in range(12)]
        assert all(mapped for mapped, _ in results[1:])  # from its second sighting: hashed, kept, mapped
        assert data[0] == 1.0
        # A submit does not hash it (a local copy costs less), and the task still gets it right.
        assert executor.submit(mapped_first_then_changed, data, 0).result(timeout=30)[1] == 1.0


def nap_then(seconds: float, value: int) -> int:
    time.sleep(seconds)
    return value


def nap_then_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def test_an_unordered_map_yields_the_shortest_task_first_and_every_result_once() -> None:
    with ZMQExecutor(max_workers=2) as executor:
        # Both processes up first (the second may start late, portable mode especially): otherwise
        # the short task could wait behind the long one in the one process there is.
        assert wait_until(lambda: len(set(executor.map(nap_then_pid, [0.2, 0.2]))) == 2, timeout=30)
        started = time.monotonic()
        results = executor.map(nap_then, [2.0, 0.1], ["long", "short"], ordered=False)
        assert next(results) == "short" and time.monotonic() - started < 1.5
        assert list(results) == ["long"]
        values = list(executor.map(abs, range(-200, 0), ordered=False, chunksize=7))
        assert sorted(values) == list(range(1, 201))


def test_an_unordered_map_reads_an_infinite_iterable_lazily_and_cancels_the_rest_on_close() -> None:
    with ZMQExecutor(max_workers=2) as executor:
        results = executor.map(abs, itertools.count(), ordered=False, buffersize=4)
        first = [next(results) for _ in range(20)]
        assert len(set(first)) == 20 and max(first) < 20 + 4  # never more than 4 submitted ahead
        results.close()


def test_an_unordered_map_times_out_raises_a_tasks_error_and_refuses_a_bad_flag() -> None:
    with ZMQExecutor(max_workers=2) as executor:
        slow = executor.map(nap_then, [1.5], [1], ordered=False, timeout=0.3)
        with pytest.raises(cf.TimeoutError):
            next(slow)
        failing = executor.map(operator.truediv, [1, 1], [1, 0], ordered=False)
        with pytest.raises(ZeroDivisionError):
            list(failing)
        with pytest.raises(TypeError, match="ordered must be True or False"):
            executor.map(abs, [1], ordered="no")  # type: ignore[arg-type]
        assert list(executor.options(task_timeout=10).map(abs, [-1, -2], ordered=False)) in ([1, 2], [2, 1])


@pytest.mark.parametrize("with_tqdm", [True, False], ids=["tqdm", "plain"])
def test_a_map_with_progress_counts_its_results_on_stderr_and_changes_nothing_else(tmp_path, with_tqdm) -> None:
    script = tmp_path / "progress.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        if not {with_tqdm}:
            sys.modules["tqdm"] = None  # as where tqdm is not installed
        from zmqexecutor import ZMQExecutor

        def square(x):
            return x * x

        if __name__ == "__main__":
            with ZMQExecutor(max_workers=2) as ex:
                print(list(ex.map(square, range(10), progress=True)))
                print(sorted(ex.options(task_timeout=30).map(square, range(5), ordered=False, progress=True)))
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [str([x * x for x in range(10)]), str([x * x for x in range(5)])]
    if with_tqdm:
        assert "10/10" in done.stderr and "5/5" in done.stderr and "100%" in done.stderr
    else:
        assert re.search(r"10/10 results, \d+/s\n", done.stderr) and re.search(r"5/5 results, \d+/s\n", done.stderr)
