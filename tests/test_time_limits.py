"""Per-task time limits: a runaway task's process is ended and replaced, and only its future fails."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, alive

from zmqexecutor import TaskOptions, TaskTimeoutError, ZMQExecutor

pytestmark = pytest.mark.timeout(90)


def nap(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def stubborn(seconds: float) -> int:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # ignores the polite stop: SIGKILL follows
    time.sleep(seconds)
    return os.getpid()


def count_runs_then_nap(marker: str, seconds: float) -> int:
    with open(marker, "a") as f:
        f.write("ran\n")
    time.sleep(seconds)
    return os.getpid()


# The relayed variant runs the supervisor's side, the same on every Python: with the slow tests (3.11 in CI).
@pytest.fixture(params=["local", pytest.param("remote", marks=pytest.mark.slow)])
def executor_args(request, start_worker) -> list[str]:
    return [start_worker(processes=2).endpoint] if request.param == "remote" else []


def open_executor(endpoints: list[str], **options) -> ZMQExecutor:
    return ZMQExecutor(endpoints, **options) if endpoints else ZMQExecutor(max_workers=2, **options)


def test_a_task_past_its_limit_fails_alone_and_its_process_is_replaced(executor_args) -> None:
    with open_executor(executor_args) as ex:
        limited = ex.options(task_timeout=0.5)
        assert isinstance(limited, TaskOptions)
        started = time.monotonic()
        runaway = limited.submit(nap, 60)
        neighbour = ex.submit(nap, 1.5)  # the other process: untouched
        with pytest.raises(TaskTimeoutError) as caught:
            runaway.result(timeout=30)
        took = time.monotonic() - started
        assert 0.5 <= took < 5, took
        error = caught.value
        assert isinstance(error, TimeoutError)
        assert error.limit == 0.5 and "time limit of 0.5 s" in str(error)
        victim = error.pid
        assert victim > 0
        survivor = neighbour.result(timeout=30)
        assert survivor != victim
        # Within the limit, on the same executor: fine; the dead process was replaced.
        pids = {limited.submit(nap, 0.05).result(timeout=30) for _ in range(6)}
        assert victim not in pids
        assert not alive(victim)
        assert list(limited.map(abs, [-1, -2])) == [1, 2]


@pytest.mark.slow  # options passed through, the same on every Python
def test_the_executors_limit_applies_to_every_task_and_options_can_lift_it(executor_args) -> None:
    with open_executor(executor_args, task_timeout=1.0) as ex:
        fast, slow = ex.submit(nap, 0.1), ex.submit(nap, 30)
        assert fast.result(timeout=30) > 0
        with pytest.raises(TaskTimeoutError):
            slow.result(timeout=30)
        unlimited = ex.options(task_timeout=None).submit(nap, 1.5)
        assert unlimited.result(timeout=30) > 0
        results = list(ex.map(nap, [0.01] * 4, chunksize=2))  # the limit is per chunk
        assert len(results) == 4


@pytest.mark.slow  # the supervisor's timer, the same on every Python
def test_a_task_that_ignores_sigterm_is_killed_after_the_grace_period(executor_args) -> None:
    with open_executor(executor_args) as ex:
        started = time.monotonic()
        with pytest.raises(TaskTimeoutError):
            ex.options(task_timeout=0.3).submit(stubborn, 60).result(timeout=30)
        took = time.monotonic() - started
        assert 2.0 <= took < 8, took  # SIGTERM at 0.3 s was ignored; SIGKILL came 2 s later
        assert ex.submit(abs, -5).result(timeout=30) == 5


def test_a_timed_out_task_is_not_retried(tmp_path, executor_args) -> None:
    marker = tmp_path / "runs"
    with open_executor(executor_args, max_retries=3) as ex:
        future = ex.options(task_timeout=0.3).submit(count_runs_then_nap, str(marker), 30)
        with pytest.raises(TaskTimeoutError):
            future.result(timeout=30)
        time.sleep(1.0)  # a retry, if there were one, would have started by now
    assert marker.read_text().count("ran") == 1


def test_bad_time_limits_are_refused_at_once() -> None:
    with pytest.raises(ValueError, match="task_timeout must be > 0"):
        ZMQExecutor(max_workers=1, task_timeout=0)
    with pytest.raises(TypeError, match="task_timeout must be a number of seconds"):
        ZMQExecutor(max_workers=1, task_timeout="5")  # type: ignore[arg-type]
    with ZMQExecutor(max_workers=1) as ex:
        with pytest.raises(ValueError, match="task_timeout must be > 0"):
            ex.options(task_timeout=-1)
        with pytest.raises(TypeError):
            ex.options(5)  # type: ignore[misc]


def test_status_counts_timed_out_tasks(start_worker) -> None:
    worker = start_worker(processes=1)
    with ZMQExecutor([worker.endpoint]) as ex:
        with pytest.raises(TaskTimeoutError):
            ex.options(task_timeout=0.3).submit(nap, 30).result(timeout=30)
        assert ex.submit(abs, -1).result(timeout=30) == 1
    out = subprocess.run([sys.executable, "-m", "zmqexecutor", "status", worker.endpoint], capture_output=True,
                         text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr
    assert "timed out 1" in out.stdout
    assert "ran a task past its time limit of 0.3 s" in worker.log()
