"""Task processes that grow: sizes as people write them, a process replaced after a task that left it
too big (max_memory_per_child), one killed while it runs past the memory limit (memory_limit), and a
kill by the kernel's out-of-memory killer told apart from other SIGKILLs. Real processes allocate for
real."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest
from conftest import WorkerProcess

from zmqexecutor import MemoryLimitError, TaskCrashedError, ZMQExecutor
from zmqexecutor._wire._memory import OomKills, format_size, parse_size, resident_bytes

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20

# What the tasks below hold on to, in their task process, between tasks: a leak.
_HELD: list[bytes] = []


def leak(mib: int) -> int:
    _HELD.append(b"\x01" * (mib * MiB))  # written, so resident: not pages the kernel has yet to give
    return os.getpid()


def hog(step_mib: int, most_mib: int) -> str:
    """Take memory step by step, as a runaway task does, up to ``most_mib`` (then give up)."""
    taken = []
    while len(taken) * step_mib < most_mib:
        taken.append(b"\x01" * (step_mib * MiB))
        time.sleep(0.01)
    return f"held {len(taken) * step_mib} MiB and was not stopped"


def pid() -> int:
    return os.getpid()


# --- sizes and sizes of processes (no sockets) -------------------------------------------------------


@pytest.mark.parametrize("text, size", [
    ("512MiB", 512 * MiB), ("2GiB", 2 << 30), ("1.5G", 1_500_000_000), ("100k", 100_000), ("1000000", 10**6),
    (" 64 mib ", 64 * MiB), ("2Gi", 2 << 30), ("7b", 7), (4096, 4096),
])
def test_sizes_are_read_as_people_write_them(text, size) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MiB", "12 parsecs", "-5", "1e9", "2 GiB extra", -1, 1.5, None])
def test_a_size_that_is_not_one_is_refused(text) -> None:
    with pytest.raises(ValueError):
        parse_size(text)  # type: ignore[arg-type]


def test_sizes_are_shown_in_binary_units() -> None:
    assert format_size(3 << 29) == "1.5 GiB"
    assert format_size(300 * MiB) == "300.0 MiB"
    assert format_size(12) == "12 bytes"


def test_a_process_that_takes_memory_is_seen_to_grow() -> None:
    before = resident_bytes()
    assert before is not None and before > 0
    # Fresh pages, written: memory this process's allocator freed earlier could be taken again unseen.
    taken = mmap.mmap(-1, 64 * MiB)
    for page in range(0, 64 * MiB, mmap.PAGESIZE):
        taken[page] = 1
    after = resident_bytes()
    assert after is not None and after - before >= 60 * MiB
    taken.close()
    assert resident_bytes(os.getppid()) is not None  # others' sizes too, where there is /proc


# --- replaced after a task that left it too big ------------------------------------------------------


@pytest.fixture(params=["local", pytest.param("remote", marks=pytest.mark.slow)])
def leaky(request, start_worker):
    """An executor of one task process that is replaced once it holds more than 150 MiB after a task."""
    if request.param == "remote":
        worker = start_worker(processes=1, extra=["--max-memory-per-child", "150MiB"])
        return lambda: ZMQExecutor([worker.endpoint])
    return lambda: ZMQExecutor(max_workers=1, max_memory_per_child="150MiB")


def test_a_process_too_big_after_a_task_is_replaced_before_the_next(leaky) -> None:
    with leaky() as ex:
        first = ex.submit(leak, 1).result(timeout=60)
        assert ex.submit(leak, 1).result(timeout=60) == first  # small: kept
        assert ex.submit(leak, 200).result(timeout=60) == first  # the task that leaks ends well...
        second = ex.submit(pid).result(timeout=60)
        assert second != first  # ...and its process did not run the next
        assert ex.submit(pid).result(timeout=60) == second


def test_tasks_queued_behind_a_process_that_retires_are_not_lost(leaky) -> None:
    with leaky() as ex:
        # Each task leaks 60 MiB: every third finds its process above the limit afterwards. Sent at
        # once, the tasks behind it wait in its queue; they run in the next process instead.
        pids = list(ex.map(leak, [60] * 12))
        assert len(pids) == 12
        processes = list(dict.fromkeys(pids))
        assert len(processes) >= 4, pids
        assert all(pids.count(p) <= 3 for p in processes), pids


# --- killed while running past the limit ---------------------------------------------------------------


@pytest.fixture(params=["local", pytest.param("remote", marks=pytest.mark.slow)])
def limited(request, start_worker):
    """An executor of two task processes, each killed if it holds more than 300 MiB while running a task."""
    if request.param == "remote":
        worker = start_worker(processes=2, extra=["--memory-limit", "300MiB"])
        return lambda: ZMQExecutor([worker.endpoint], max_retries=5)
    return lambda: ZMQExecutor(max_workers=2, memory_limit="300MiB", max_retries=5)


def test_a_task_past_the_memory_limit_fails_alone_and_its_process_is_replaced(limited) -> None:
    with limited() as ex:
        neighbour = ex.submit(time.sleep, 1.0)
        runaway = ex.submit(hog, 20, 3000)
        with pytest.raises(MemoryLimitError) as caught:
            runaway.result(timeout=60)
        error = caught.value
        assert isinstance(error, TaskCrashedError) and isinstance(error, BrokenProcessPool)
        assert error.limit == 300 * MiB
        assert error.peak > 300 * MiB
        assert "300.0 MiB" in str(error) and error.host in str(error) and str(error.pid) in str(error)
        assert error.signal == "SIGKILL"
        assert neighbour.result(timeout=60) is None  # the other process ran on
        # Not retried (it would only fail again), and the pool is whole: both processes serve.
        assert sorted(ex.map(abs, range(-3, 0))) == [1, 2, 3]
        assert len({ex.submit(pid).result(timeout=60) for _ in range(4)} - {error.pid}) >= 1
        assert error.pid not in {ex.submit(pid).result(timeout=60) for _ in range(4)}


def test_tasks_within_the_limit_are_untouched(limited) -> None:
    with limited() as ex:
        assert ex.submit(hog, 20, 100).result(timeout=60) == "held 100 MiB and was not stopped"


def test_memory_limits_are_checked_when_the_executor_is_made() -> None:
    with pytest.raises(ValueError, match="expected a size such as 512MiB"):
        ZMQExecutor(max_workers=1, memory_limit="lots")
    with pytest.raises(TypeError, match="max_memory_per_child must be a number of bytes"):
        ZMQExecutor(max_workers=1, max_memory_per_child=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="--memory-limit SIZE"):
        ZMQExecutor(["tcp://127.0.0.1:5555"], memory_limit="1GiB")


def test_the_worker_refuses_a_size_it_cannot_read() -> None:
    done = subprocess.run([sys.executable, "-m", "zmqexecutor", "worker", "--bind", "tcp://127.0.0.1:*",
                           "--max-memory-per-child", "2 GB please"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "expected a size such as 512MiB" in done.stderr


# --- the kernel's out-of-memory killer --------------------------------------------------------------------


@pytest.fixture
def small_cgroup():
    """A cgroup v1 memory group of 400 MiB under ours, where this host lets us make one (root, v1)."""
    counter = OomKills().path
    if counter is None or not counter.endswith("memory.oom_control") or not os.access(os.path.dirname(counter), os.W_OK):
        pytest.skip("needs a writable cgroup v1 memory hierarchy")
    group = Path(os.path.dirname(counter)) / f"zmqexecutor-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(400 * MiB))
        swap = group / "memory.memsw.limit_in_bytes"
        if swap.exists():
            swap.write_text(str(400 * MiB))
        yield group
    finally:
        for _ in range(100):
            try:
                group.rmdir()
                break
            except OSError:  # its processes are still leaving
                time.sleep(0.1)


@pytest.mark.slow
def test_a_kill_by_the_out_of_memory_killer_says_so(small_cgroup) -> None:
    enter = f'echo $$ > {small_cgroup / "cgroup.procs"} && exec "$@"'
    worker = WorkerProcess("tcp://127.0.0.1:*", 1, prefix=["sh", "-c", enter, "sh"])
    try:
        worker.wait_ready()
        with ZMQExecutor([worker.endpoint], max_retries=0) as ex:
            with pytest.raises(TaskCrashedError) as caught:
                ex.submit(hog, 20, 3000).result(timeout=60)
            assert not isinstance(caught.value, MemoryLimitError)
            assert "SIGKILL" in str(caught.value)
            assert "out-of-memory killer" in str(caught.value)
            assert ex.submit(pid).result(timeout=60) != caught.value.pid
    finally:
        worker.stop()
