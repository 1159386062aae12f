"""Workers that dial in: ZMQExecutor(listen=...) and `zmqexecutor worker --connect`, with real worker
processes on loopback TCP, killed and drained for real."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, mark_then_nap, wait_until

from zmqexecutor import SecurityError, ZMQExecutor

pytestmark = pytest.mark.timeout(90)


def ready_count(ex: ZMQExecutor) -> int:
    return sum(info.state == "ready" for info in ex.workers())


def mark_once(folder: str, i: int) -> int:
    # O_EXCL: a task that ran twice fails its second run.
    os.close(os.open(os.path.join(folder, f"{i}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    time.sleep(0.01)
    return i


def test_workers_dial_in_with_keys_and_take_tasks(start_worker, keys: Path) -> None:
    with ZMQExecutor(listen="tcp://127.0.0.1:0", keys=keys / "client") as ex:
        assert ex.listen_address is not None and not ex.listen_address.endswith(":0")
        assert ex.endpoints == ()
        for _ in range(2):
            start_worker(ex.listen_address, processes=1, connect=True, extra=["--keys", str(keys / "worker")])
        ex.wait_for_workers(2, timeout=30)
        infos = ex.workers()
        assert [info.state for info in infos] == ["ready", "ready"]
        assert all("via " + ex.listen_address in info.endpoint and info.slots == 1 for info in infos)
        assert sorted(ex.map(abs, range(-50, 0))) == list(range(1, 51))
        assert sum(info.completed for info in ex.workers()) == 50


@pytest.mark.slow  # sockets and processes, the same on every Python
def test_a_worker_with_a_key_the_client_does_not_allow_is_refused(start_worker, keys: Path, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    subprocess.run([sys.executable, "-m", "zmqexecutor", "keygen", str(stranger)], check=True, timeout=60,
                   capture_output=True)
    # The stranger pins our client's real public key but brings a key pair of its own.
    (stranger / "worker" / "client.key").write_text((keys / "worker" / "client.key").read_text())
    with ZMQExecutor(listen="tcp://127.0.0.1:0", keys=keys / "client") as ex:
        worker = start_worker(ex.listen_address, processes=1, connect=True,
                              extra=["--keys", str(stranger / "worker")])
        assert wait_until(lambda: "refused this worker's key" in worker.log(), timeout=20), worker.log()
        assert ex.workers() == ()
        with pytest.raises(TimeoutError, match="0 of 1 workers ready"):
            ex.wait_for_workers(1, timeout=0.5)


@pytest.mark.slow  # sockets and processes, the same on every Python
def test_workers_join_late_and_leave_mid_run_and_every_task_runs_exactly_once(start_worker, tmp_path: Path) -> None:
    # Own key store on loopback, so no keys to pass: the default a user gets on one machine.
    done = tmp_path / "done"
    done.mkdir()
    with ZMQExecutor(listen="tcp://127.0.0.1:0", connect_timeout=None) as ex:
        first = start_worker(ex.listen_address, processes=2, connect=True)
        ex.wait_for_workers(1, timeout=30)
        results = ex.map(mark_once, [str(done)] * 400, range(400))
        got = [next(results) for _ in range(20)]
        late = start_worker(ex.listen_address, processes=2, connect=True)  # joins mid-run
        assert wait_until(lambda: ready_count(ex) == 2, timeout=30)
        assert wait_until(lambda: all(info.completed for info in ex.workers()), timeout=30)
        first.process.send_signal(signal.SIGTERM)  # leaves gracefully: drains
        got += list(results)
        assert got == list(range(400))
        assert sorted(int(name) for name in os.listdir(done)) == list(range(400))
        assert first.process.wait(30) == 0
        assert wait_until(lambda: [info.pid for info in ex.workers()] == [late.pid], timeout=10)


@pytest.mark.slow  # sockets and processes, the same on every Python
def test_a_killed_worker_is_lost_at_once_and_its_tasks_are_retried(start_worker, tmp_path: Path) -> None:
    with ZMQExecutor(listen="tcp://127.0.0.1:0") as ex:
        doomed = start_worker(ex.listen_address, processes=1, connect=True)
        ex.wait_for_workers(1, timeout=30)
        marker = str(tmp_path / "started")
        running = ex.submit(mark_then_nap, marker, 2.0)
        assert wait_until(lambda: os.path.exists(marker), timeout=30)
        survivor = start_worker(ex.listen_address, processes=1, connect=True)
        assert wait_until(lambda: ready_count(ex) == 2, timeout=30)
        os.kill(doomed.pid, signal.SIGKILL)
        began = time.monotonic()
        assert wait_until(lambda: len(ex.workers()) == 1, timeout=10)
        assert time.monotonic() - began < 2.0  # not after a heartbeat timeout: the closed connection tells
        assert running.result(timeout=30) != doomed.pid  # run again, on the survivor
        assert [info.pid for info in ex.workers()] == [survivor.pid]


@pytest.mark.slow  # sockets and processes, the same on every Python
def test_bound_and_dialled_workers_together_and_endpoints_added_and_removed(start_worker) -> None:
    bound = start_worker(processes=1)
    spare = start_worker(processes=1)
    with ZMQExecutor(bound.endpoint, listen="tcp://127.0.0.1:0") as ex:
        start_worker(ex.listen_address, processes=1, connect=True)
        ex.wait_for_workers(2, timeout=30)
        assert ex.workers()[0].endpoint == bound.endpoint  # bound endpoints first, in their order
        ex.add_endpoints(spare.endpoint)
        assert ex.endpoints == (bound.endpoint, spare.endpoint)
        ex.wait_for_workers(3, timeout=30)
        assert sum(ex.map(abs, range(-300, 0))) == 45150
        assert all(info.completed for info in ex.workers())
        slow = [ex.submit(time.sleep, 0.3) for _ in range(6)]
        ex.remove_endpoints([bound.endpoint])
        assert [f.result(timeout=30) for f in slow] == [None] * 6  # what ran there finished there
        assert wait_until(lambda: bound.endpoint not in [info.endpoint for info in ex.workers()], timeout=10)
        assert ex.endpoints == (spare.endpoint,)
        assert sum(ex.map(abs, range(-30, 0))) == 465
        with pytest.raises(ValueError, match="not an endpoint"):
            ex.remove_endpoints(bound.endpoint)
        with pytest.raises(ValueError, match="already an endpoint"):
            ex.add_endpoints(spare.endpoint)


def test_listen_is_checked_where_it_is_given(tmp_path: Path) -> None:
    with pytest.raises(SecurityError, match="refusing to listen on tcp://0.0.0.0"):
        ZMQExecutor(listen="tcp://0.0.0.0:0")
    with pytest.raises(ValueError, match="malformed"):
        ZMQExecutor(listen="tcp://127.0.0.1")
    with pytest.raises(TypeError, match="listen must be an address"):
        ZMQExecutor(listen=5555)  # type: ignore[arg-type]
    port = free_port()
    with ZMQExecutor(listen=f"tcp://127.0.0.1:{port}") as ex:
        assert ex.listen_address == f"tcp://127.0.0.1:{port}"
        with pytest.raises(OSError, match="cannot listen on .*Address already in use"):
            ZMQExecutor(listen=f"tcp://127.0.0.1:{port}")
    with pytest.raises(OSError, match="listen takes an address of this machine"):
        ZMQExecutor(listen="tcp://192.0.2.1:5555", insecure=True)  # not ours (a documentation address)
        with pytest.raises(ValueError, match="n must be >= 1"):
            ex.wait_for_workers(0)
    with pytest.raises(RuntimeError, match="local workers of its own"):
        with ZMQExecutor(1) as ex:
            ex.add_endpoints("tcp://127.0.0.1:5555")


@pytest.mark.slow  # sockets and processes, the same on every Python
def test_a_task_waits_connect_timeout_for_a_worker_to_dial_in() -> None:
    with ZMQExecutor(listen="tcp://127.0.0.1:0", connect_timeout=0.5) as ex:
        future = ex.submit(abs, -1)
        with pytest.raises(Exception, match="no worker became reachable within connect_timeout=0.5 s .*listening at"):
            future.result(timeout=10)


def run_worker(*args: str, stdin: bytes | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zmqexecutor", "worker", *args], input=stdin,
                          capture_output=True, timeout=timeout)


@pytest.mark.slow  # sockets and processes, the same on every Python
def test_the_dialling_worker_refuses_plain_text_to_another_host_and_bad_keys_on_stdin() -> None:
    done = run_worker("--connect", "tcp://192.0.2.1:5555", "--processes", "1")
    assert done.returncode == 2 and b"refusing to dial tcp://192.0.2.1:5555 without keys" in done.stderr
    done = run_worker("--connect", "tcp://127.0.0.1:5555", "--keys-from-stdin", stdin=b"not json\n")
    assert done.returncode == 2 and b"expected the keys on standard input as one JSON line" in done.stderr
    done = run_worker("--connect", "tcp://127.0.0.1:5555", "--bind", "tcp://127.0.0.1:5556")
    assert done.returncode == 2 and b"not allowed with argument" in done.stderr


@pytest.mark.slow  # sockets and processes, the same on every Python
def test_idle_timeout_and_exit_with_stdin_stop_a_worker_nobody_uses() -> None:
    began = time.monotonic()
    done = run_worker("--connect", f"tcp://127.0.0.1:{free_port()}", "--processes", "1", "--idle-timeout", "1")
    assert done.returncode == 0 and b"no client for 1 s" in done.stderr
    assert time.monotonic() - began < 20
    worker = subprocess.Popen([sys.executable, "-m", "zmqexecutor", "worker", "--connect",
                               f"tcp://127.0.0.1:{free_port()}", "--processes", "1", "--exit-with-stdin"],
                              stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert worker.stderr is not None and worker.stdin is not None
    assert any(b"worker ready" in line for line in worker.stderr)  # stops reading there (or at its end)
    worker.stdin.close()  # as when the launcher (or the ssh connection) goes away: it drains
    assert worker.wait(20) == 0
    assert b"standard input closed (whoever started this worker is gone): draining" in worker.stderr.read()


def test_an_array_inside_a_maps_callable_or_its_arguments_reaches_dialled_workers_right_each_time(start_worker) -> None:
    import functools

    import numpy
    from test_executor import first_plus_value

    with ZMQExecutor(listen="tcp://127.0.0.1:0") as ex:
        for _ in range(2):
            start_worker(ex.listen_address, processes=1, connect=True)
        ex.wait_for_workers(2, timeout=30)
        data = numpy.zeros(1_000_000)  # kept by each worker after its first task, then named
        assert list(ex.map(functools.partial(first_plus_value, data), range(20))) == [float(x) for x in range(20)]
        data[0] = 50.0
        assert list(ex.map(functools.partial(first_plus_value, data), range(6))) == [50.0 + x for x in range(6)]
        data[0] = 70.0  # and as the argument of every task
        assert list(ex.map(first_plus_value, [data] * 20, range(20))) == [70.0 + x for x in range(20)]
