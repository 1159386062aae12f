"""A worker asked to stop (SIGTERM, ``zmqexecutor drain``) drains: no task is lost, failed or retried."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, TESTS, WorkerProcess, free_port, mark_then_nap, wait_until
from zmqexecutor import WorkerLostError, ZMQExecutor

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def run_once(folder: str, i: int) -> int:
    # O_EXCL: a second run of the same task fails it, so exactly-once is checked by the task itself.
    os.close(os.open(os.path.join(folder, str(i)), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    time.sleep(0.05)  # 1,000 of them on 6 slots: long enough for 3 restarts
    return i


def nap(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def zmqexecutor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zmqexecutor", *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)])))


@pytest.fixture
def workers():
    started: list[WorkerProcess] = []

    def start(endpoint: str, processes: int = 1, extra: list[str] | None = None) -> WorkerProcess:
        worker = WorkerProcess(endpoint, processes, extra).wait_ready()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def test_a_rolling_restart_of_every_worker_loses_fails_and_retries_nothing(workers, tmp_path) -> None:
    endpoints = [f"tcp://127.0.0.1:{free_port()}" for _ in range(3)]
    current = {endpoint: workers(endpoint, processes=2) for endpoint in endpoints}
    codes = []
    restarted_at = []
    failed = threading.Event()

    def restart_each_in_turn() -> None:
        for endpoint in endpoints:
            if failed.wait(0.3):
                return
            old = current[endpoint]
            old.process.send_signal(signal.SIGTERM)
            codes.append(old.process.wait(60))
            current[endpoint] = workers(endpoint, processes=2)
        restarted_at.append(time.monotonic())

    folder = tmp_path / "runs"
    folder.mkdir()
    # max_retries=0: a task lost with a worker would fail the map, so success means none was lost.
    restarts = threading.Thread(target=restart_each_in_turn)
    try:
        with ZMQExecutor(endpoints, max_retries=0, connect_timeout=60) as ex:
            restarts.start()
            results = list(ex.map(run_once, [str(folder)] * 1000, range(1000)))
            finished_at = time.monotonic()
            lost = [w.lost for w in ex.workers()]
    finally:
        failed.set()  # (if the map failed) no more restarts: the fixture stops the workers it knows
        if restarts.is_alive():
            restarts.join(120)
    assert results == list(range(1000))
    assert len(os.listdir(folder)) == 1000
    assert codes == [0, 0, 0]
    assert lost == [0, 0, 0]  # each drained and left: none was given up on
    assert restarted_at and restarted_at[0] < finished_at  # every restart happened during the map
    for endpoint in endpoints:  # every old worker said it drained
        assert current[endpoint].process.poll() is None


def test_a_queued_task_goes_back_and_runs_on_the_next_worker_while_the_running_one_finishes(workers, tmp_path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    old = workers(endpoint)
    marker = tmp_path / "long"
    with ZMQExecutor([endpoint], max_retries=0, connect_timeout=60) as ex:
        assert wait_until(lambda: ex.workers()[0].state == "ready", 30)
        long = ex.submit(mark_then_nap, str(marker), 2.0)
        assert wait_until(marker.exists, 30)
        queued = ex.submit(nap, 0)  # sent ahead: it waits in the worker's own queue
        assert wait_until(queued.running, 10)
        old.process.send_signal(signal.SIGTERM)
        assert wait_until(lambda: ex.workers()[0].state == "draining", 10)
        assert long.result(timeout=30) == int(marker.read_text())  # finished where it ran
        assert old.process.wait(30) == 0
        assert not queued.done()  # handed back: it waits here for a worker, no retry counted
        new = workers(endpoint)
        assert queued.result(timeout=30) in {int(pid) for pid in other_pids(new)}


def test_a_task_handed_back_goes_to_another_worker(workers, tmp_path) -> None:
    draining = workers(f"tcp://127.0.0.1:{free_port()}")
    other = workers(f"tcp://127.0.0.1:{free_port()}")
    with ZMQExecutor([draining.endpoint, other.endpoint], max_retries=0) as ex:
        assert wait_until(lambda: all(w.state == "ready" for w in ex.workers()), 30)
        blockers = [ex.submit(mark_then_nap, str(tmp_path / f"b{i}"), 2.0) for i in range(2)]
        assert wait_until(lambda: all((tmp_path / f"b{i}").exists() for i in range(2)), 30)
        waiting = [ex.submit(nap, 0) for _ in range(2)]  # one sent ahead to each worker
        assert wait_until(lambda: all(f.running() for f in waiting), 10)
        draining_pids = set(other_pids(draining))
        draining.process.send_signal(signal.SIGTERM)
        pids = {f.result(timeout=30) for f in waiting}
        assert all(b.result(timeout=30) for b in blockers)
        assert draining.process.wait(30) == 0
    assert pids and not pids & draining_pids  # both ran on the other worker


def other_pids(worker: WorkerProcess) -> list[int]:
    from conftest import children_of
    return sorted(children_of(worker.pid))


def test_a_second_sigterm_stops_a_draining_worker_at_once(workers, tmp_path) -> None:
    worker = workers(f"tcp://127.0.0.1:{free_port()}")
    marker = tmp_path / "long"
    with ZMQExecutor([worker.endpoint], max_retries=0) as ex:
        future = ex.submit(mark_then_nap, str(marker), 60)
        assert wait_until(marker.exists, 30)
        worker.process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert worker.process.poll() is None  # draining: the task still runs
        assert "DRAINING" in zmqexecutor("status", worker.endpoint).stdout
        worker.process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        worker.process.wait(15)
        assert time.monotonic() - started < 10
        with pytest.raises(WorkerLostError):
            future.result(timeout=30)


def test_the_drain_timeout_bounds_the_wait_for_running_tasks(workers, tmp_path) -> None:
    worker = workers(f"tcp://127.0.0.1:{free_port()}", extra=["--drain-timeout", "1"])
    marker = tmp_path / "long"
    with ZMQExecutor([worker.endpoint], max_retries=0) as ex:
        future = ex.submit(mark_then_nap, str(marker), 60)
        assert wait_until(marker.exists, 30)
        started = time.monotonic()
        worker.process.send_signal(signal.SIGTERM)
        assert worker.process.wait(30) == 0
        assert 1.0 <= time.monotonic() - started < 10
        with pytest.raises(WorkerLostError):
            future.result(timeout=30)


def test_zmqexecutor_drain_asks_a_worker_to_drain_and_it_exits(workers) -> None:
    worker = workers(f"tcp://127.0.0.1:{free_port()}")
    done = zmqexecutor("drain", worker.endpoint)
    assert done.returncode == 0, done.stderr
    assert "draining: 0 task(s) running" in done.stdout
    assert worker.process.wait(30) == 0
