"""A worker asked to stop (SIGTERM, ``zmqexecutor drain``) drains: no task is lost, failed or retried."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import (
    ROOT,
    TESTS,
    WorkerProcess,
    alive,
    free_port,
    mark_then_nap,
    wait_until,
)

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

    def start(endpoint: str, processes: int = 1, extra: list[str] | None = None, connect: bool = False,
              own_group: bool = False) -> WorkerProcess:
        worker = WorkerProcess(endpoint, processes, extra, connect=connect, own_group=own_group).wait_ready()
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


# --- stopped the way clusters stop a worker: every one of its processes gets the signal ---------------


def sigterm_all(worker: WorkerProcess, order: str) -> None:
    """SIGTERM to each of the worker's processes: to its process group at once (``kill -TERM -PGID``,
    Slurm, systemd's control group), or to its task processes a moment before or after the supervisor."""
    if order == "group":
        os.killpg(worker.pid, signal.SIGTERM)
        return
    if order == "group, echoed":  # Slurm's step signal, then srun's copy of it: one request
        os.killpg(worker.pid, signal.SIGTERM)
        time.sleep(0.02)
        os.killpg(worker.pid, signal.SIGTERM)
        return
    tasks = sorted(other_pids(worker))
    assert tasks
    for pids in ([worker.pid], tasks) if order == "supervisor first" else (tasks, [worker.pid]):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # a quick drain may be over already
                os.kill(pid, signal.SIGTERM)
        time.sleep(0.3)


@pytest.mark.parametrize("order", ["group", "group, echoed", "task processes first", "supervisor first"])
def test_sigterm_to_every_process_of_a_worker_drains_it_and_runs_each_task_once(workers, tmp_path, order) -> None:
    stopped = workers(f"tcp://127.0.0.1:{free_port()}", processes=2, own_group=True)
    other = workers(f"tcp://127.0.0.1:{free_port()}", processes=2)
    folder = tmp_path / "runs"
    folder.mkdir()
    # max_retries=0: a task killed with its worker, or retried, fails the map.
    with ZMQExecutor([stopped.endpoint, other.endpoint], max_retries=0, connect_timeout=60) as ex:
        assert wait_until(lambda: all(w.state == "ready" for w in ex.workers()), 30)
        results = ex.map(run_once, [str(folder)] * 200, range(200))
        got = [next(results) for _ in range(20)]  # under way on both workers
        time.sleep(0.5)
        sigterm_all(stopped, order)
        got += list(results)
        assert stopped.process.wait(30) == 0
    assert got == list(range(200))
    assert sorted(int(name) for name in os.listdir(folder)) == list(range(200))
    assert "killed by SIGTERM" not in stopped.log()


def test_sigterm_to_a_dialled_in_worker_s_process_group_drains_it(workers, tmp_path) -> None:
    folder = tmp_path / "runs"
    folder.mkdir()
    with ZMQExecutor(listen="tcp://127.0.0.1:0", max_retries=0, connect_timeout=None) as ex:
        assert ex.listen_address is not None
        stopped = workers(ex.listen_address, processes=2, connect=True, own_group=True)
        ex.wait_for_workers(1, timeout=30)
        results = ex.map(run_once, [str(folder)] * 200, range(200))
        got = [next(results) for _ in range(10)]
        workers(ex.listen_address, processes=2, connect=True)  # joins late
        ex.wait_for_workers(2, timeout=30)
        os.killpg(stopped.pid, signal.SIGTERM)
        got += list(results)
        assert stopped.process.wait(30) == 0
    assert got == list(range(200))
    assert sorted(int(name) for name in os.listdir(folder)) == list(range(200))


def test_a_second_sigterm_to_the_group_still_stops_at_once_and_the_task_is_retried(workers, tmp_path) -> None:
    stopped = workers(f"tcp://127.0.0.1:{free_port()}", own_group=True)
    marker = tmp_path / "long"
    with ZMQExecutor([stopped.endpoint], max_retries=1, connect_timeout=60) as ex:
        future = ex.submit(mark_then_nap, str(marker), 60)
        assert wait_until(marker.exists, 30)
        first_pid = int(marker.read_text())
        os.killpg(stopped.pid, signal.SIGTERM)
        time.sleep(1.5)  # past the task processes' wait for the supervisor's drain: they still run
        assert stopped.process.poll() is None and alive(first_pid)
        marker.unlink()
        started = time.monotonic()
        os.killpg(stopped.pid, signal.SIGTERM)
        assert stopped.process.wait(15) == 0
        assert time.monotonic() - started < 10
        # Lost with its worker, not crashed: it runs again on another worker (one retry allowed).
        assert not future.done()
        other = workers(f"tcp://127.0.0.1:{free_port()}")
        ex.add_endpoints(other.endpoint)
        assert wait_until(marker.exists, 30)
        assert int(marker.read_text()) in other_pids(other)
        assert ex.cancel(future, force=True)


def test_a_task_killed_by_sigkill_while_its_worker_drains_is_retried_not_crashed(workers, tmp_path) -> None:
    stopped = workers(f"tcp://127.0.0.1:{free_port()}", own_group=True)
    other = workers(f"tcp://127.0.0.1:{free_port()}")
    marker = tmp_path / "long"
    with ZMQExecutor([stopped.endpoint], max_retries=1, connect_timeout=60) as ex:
        assert wait_until(lambda: ex.workers()[0].state == "ready", 30)
        future = ex.submit(mark_then_nap, str(marker), 3.0)
        assert wait_until(marker.exists, 30)
        os.killpg(stopped.pid, signal.SIGTERM)
        assert wait_until(lambda: ex.workers()[0].state == "draining", 10)
        ex.add_endpoints(other.endpoint)
        # What Slurm does after KillWait, the task process reached first: SIGKILL.
        marker_pid = int(marker.read_text())
        marker.unlink()
        os.kill(marker_pid, signal.SIGKILL)
        assert future.result(timeout=30) in other_pids(other)
        assert stopped.process.wait(30) == 0


def test_a_task_cut_short_by_the_drain_timeout_is_retried_elsewhere(workers, tmp_path) -> None:
    stopped = workers(f"tcp://127.0.0.1:{free_port()}", extra=["--drain-timeout", "1"], own_group=True)
    marker = tmp_path / "long"
    with ZMQExecutor([stopped.endpoint], max_retries=1, connect_timeout=60) as ex:
        future = ex.submit(mark_then_nap, str(marker), 5.0)
        assert wait_until(marker.exists, 30)
        marker.unlink()
        os.killpg(stopped.pid, signal.SIGTERM)
        assert stopped.process.wait(30) == 0
        assert not future.done()  # lost with its worker: it waits for another
        other = workers(f"tcp://127.0.0.1:{free_port()}")
        ex.add_endpoints(other.endpoint)
        assert future.result(timeout=30) in other_pids(other)


def first_after_nap(array, x: int) -> float:
    time.sleep(0.05)
    return float(array[0]) + x


def test_tasks_that_name_kept_buffers_handed_back_by_a_draining_worker_run_elsewhere(workers) -> None:
    import functools

    import numpy

    draining = workers(f"tcp://127.0.0.1:{free_port()}")
    other = workers(f"tcp://127.0.0.1:{free_port()}")
    data = numpy.full(1_000_000, 2.0)  # 8 MB: kept by each worker, then named
    with ZMQExecutor([draining.endpoint, other.endpoint], max_retries=0) as ex:
        assert wait_until(lambda: all(w.state == "ready" for w in ex.workers()), 30)
        for args in ((functools.partial(first_after_nap, data), range(40)), (first_after_nap, [data] * 40, range(40))):
            results = ex.map(*args)
            got = [next(results) for _ in range(4)]
            if args[0] is first_after_nap:
                draining.process.send_signal(signal.SIGTERM)  # its queued tasks come back, held markers and all
            got += list(results)
            assert got == [2.0 + x for x in range(40)]
        assert draining.process.wait(30) == 0
