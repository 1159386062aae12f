"""Stopping one running task (``ex.cancel(future, force=True)``): its process is killed and replaced,
its future is cancelled at once, and nothing else is touched."""

from __future__ import annotations

import concurrent.futures as cf
import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT, alive, mark_then_nap, wait_until

from zmqexecutor import ZMQExecutor

pytestmark = pytest.mark.timeout(90)


def nap(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


# The relayed variant runs the supervisor's side, the same on every Python: with the slow tests (3.11 in CI).
@pytest.fixture(params=["local", pytest.param("remote", marks=pytest.mark.slow)])
def endpoints(request, start_worker) -> list[str]:
    return [start_worker(processes=2).endpoint] if request.param == "remote" else []


def open_executor(endpoints: list[str]) -> ZMQExecutor:
    return ZMQExecutor(endpoints) if endpoints else ZMQExecutor(max_workers=2)


def test_a_running_task_stopped_by_force_is_cancelled_and_its_process_killed(endpoints, tmp_path) -> None:
    marker = tmp_path / "pid"
    seen = []
    with open_executor(endpoints) as ex:
        runaway = ex.submit(mark_then_nap, str(marker), 60)
        neighbour = ex.submit(nap, 1.0)
        assert wait_until(marker.exists, 30)
        victim = int(marker.read_text())
        runaway.add_done_callback(seen.append)
        assert runaway.running() and not runaway.cancel()  # the stdlib's cancel refuses, as always
        assert ex.cancel(runaway) is False  # and so does ours without force
        assert ex.cancel(runaway, force=True) is True
        assert runaway.cancelled() and runaway.done() and seen == [runaway]
        with pytest.raises(cf.CancelledError):
            runaway.result(timeout=0)
        done, _ = cf.wait([runaway, neighbour], timeout=30)
        assert runaway in done
        assert wait_until(lambda: not alive(victim), 10), "the process running it was not killed"
        assert neighbour.result(timeout=30) != victim
        assert sorted(ex.map(abs, [-1, -2, -3])) == [1, 2, 3]  # the replacement works
        assert ex.submit(nap, 0).result(timeout=30) != victim
    assert seen == [runaway]  # callbacks ran once


def test_force_cancel_of_a_pending_task_never_runs_it_and_of_a_done_one_is_refused(endpoints, tmp_path) -> None:
    with open_executor(endpoints) as ex:
        pending = ex.submit(mark_then_nap, str(tmp_path / "pending"), 0)  # no worker ready yet: here
        assert ex.cancel(pending, force=True) is True and pending.cancelled()
        finished = ex.submit(abs, -4)
        assert finished.result(timeout=30) == 4
        assert ex.cancel(finished, force=True) is False and not finished.cancelled()
        time.sleep(0.3)
    assert not (tmp_path / "pending").exists()


@pytest.mark.slow  # scheduling, the same on every Python (the running task's kill stays)
def test_force_cancel_drops_a_task_waiting_in_a_workers_queue(start_worker, tmp_path) -> None:
    worker = start_worker(processes=1)
    with ZMQExecutor([worker.endpoint]) as ex:
        assert wait_until(lambda: ex.workers()[0].state == "ready", 30)
        blocker = ex.submit(mark_then_nap, str(tmp_path / "blocker"), 1.5)
        assert wait_until((tmp_path / "blocker").exists, 30)
        # One task is sent ahead per slot before any has finished: it waits in the worker's queue.
        queued = ex.submit(mark_then_nap, str(tmp_path / "queued"), 0)
        assert wait_until(queued.running, 10)
        assert ex.cancel(queued, force=True) is True and queued.cancelled()
        blocker.result(timeout=30)
        assert ex.submit(abs, -1).result(timeout=30) == 1
    assert not (tmp_path / "queued").exists()
    assert "killing task process" not in worker.log()  # dropped, not killed: nothing was running it


def test_status_counts_tasks_killed_on_request(start_worker, tmp_path) -> None:
    worker = start_worker(processes=1)
    marker = tmp_path / "pid"
    with ZMQExecutor([worker.endpoint]) as ex:
        future = ex.submit(mark_then_nap, str(marker), 60)
        assert wait_until(marker.exists, 30)
        assert ex.cancel(future, force=True)
        assert wait_until(lambda: not alive(int(marker.read_text())), 10)
        assert ex.submit(abs, -1).result(timeout=30) == 1
    out = subprocess.run([sys.executable, "-m", "zmqexecutor", "status", worker.endpoint], capture_output=True,
                         text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr
    assert "killed on request 1" in out.stdout
