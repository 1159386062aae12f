"""Workers started with the command line, named by endpoint, and faults inside them."""

from __future__ import annotations

import ctypes
import functools
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy
import pytest
import zmq
from conftest import ROOT, alive, children_of, free_port, raw_dealer, wait_until

from zmqexecutor import (
    NoWorkersError,
    TaskCrashedError,
    VersionMismatchError,
    ZMQExecutor,
)
from zmqexecutor._wire import _features
from zmqexecutor._wire import _protocol as proto
from zmqexecutor._wire._protocol import Kind


def whoami() -> tuple[int, int]:
    return os.getppid(), os.getpid()


def sleep_then_whoami(seconds: float) -> tuple[int, int]:
    time.sleep(seconds)
    return whoami()


def kill_myself(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(10)


def segfault() -> None:
    ctypes.string_at(0)


def test_worker_named_by_tcp_endpoint(start_worker) -> None:
    worker = start_worker(processes=2)
    with ZMQExecutor(worker.endpoint) as ex:
        results = [f.result(timeout=30) for f in [ex.submit(whoami) for _ in range(10)]]
    assert {parent for parent, _ in results} == {worker.pid}
    assert len({pid for _, pid in results}) <= 2


def test_worker_named_by_ipc_endpoint(start_worker, tmp_path) -> None:
    worker = start_worker(f"ipc://{tmp_path}/w.sock", processes=1)
    with ZMQExecutor([worker.endpoint]) as ex:
        assert ex.submit(whoami).result(timeout=30)[0] == worker.pid


def test_round_robin_over_two_workers(start_worker) -> None:
    first, second = start_worker(processes=1), start_worker(processes=1)
    with ZMQExecutor([first.endpoint, second.endpoint]) as ex:
        assert wait_until(lambda: all(w.state == "ready" for w in ex.workers()))
        # Four tasks fit the credit of the two single-slot workers (slot + prefetch each): two apiece.
        parents = [f.result(timeout=30)[0] for f in [ex.submit(sleep_then_whoami, 0.2) for _ in range(4)]]
    assert parents.count(first.pid) == 2 and parents.count(second.pid) == 2


def test_max_workers_caps_tasks_in_flight_across_workers(start_worker) -> None:
    worker = start_worker(processes=4)
    with ZMQExecutor(worker.endpoint, max_workers=1) as ex:
        started = time.monotonic()
        list(ex.map(sleep_then_whoami, [0.2] * 4))
        elapsed = time.monotonic() - started
    assert elapsed >= 0.75  # one at a time, although the worker has four slots


def test_workers_view_reports_state_and_counts(start_worker, tcp_endpoint) -> None:
    worker = start_worker(processes=2)
    with ZMQExecutor([worker.endpoint, tcp_endpoint], connect_timeout=30) as ex:
        assert [w.endpoint for w in ex.workers()] == [worker.endpoint, tcp_endpoint]
        assert [f.result(timeout=30) for f in [ex.submit(abs, -i) for i in range(5)]] == list(range(5))
        ready, down = ex.workers()
        assert (ready.state, ready.slots, ready.completed, ready.in_flight, ready.lost) == ("ready", 2, 5, 0, 0)
        assert ready.pid == worker.pid and ready.host and ready.instance and ready.error is None
        assert (down.state, down.slots, down.completed, down.pid) == ("connecting", 0, 0, None)
        slow = ex.submit(sleep_then_whoami, 0.5)
        assert wait_until(lambda: ex.workers()[0].in_flight == 1)
        slow.result(timeout=30)
        assert ex.workers()[0].in_flight == 0 and ex.workers()[0].completed == 6


def test_two_executors_share_one_worker(start_worker) -> None:
    worker = start_worker(processes=2)
    with ZMQExecutor(worker.endpoint) as a, ZMQExecutor(worker.endpoint) as b:
        fa = [a.submit(sleep_then_whoami, 0.1) for _ in range(6)]
        fb = [b.submit(pow, i, 2) for i in range(6)]
        assert [f.result(timeout=30)[0] for f in fa] == [worker.pid] * 6
        assert [f.result(timeout=30) for f in fb] == [i * i for i in range(6)]
        a.shutdown()
        assert b.submit(abs, -4).result(timeout=30) == 4


@pytest.mark.slow  # the executor tests keep one crash on every Python
@pytest.mark.parametrize(
    "fn, args, expect",
    [
        (kill_myself, (signal.SIGKILL,), "was killed by SIGKILL"),
        # Held a moment (the worker may be draining: Slurm signals all its processes), then deadly.
        (kill_myself, (signal.SIGTERM,), "was killed by SIGTERM"),
        (segfault, (), "was killed by SIGSEGV"),
        (os._exit, (7,), "exited with code 7"),
    ],
    ids=["sigkill", "sigterm", "segfault", "os_exit"],
)
def test_a_dying_task_process_fails_one_future_and_is_replaced(start_worker, fn, args, expect) -> None:
    worker = start_worker(processes=2)
    with ZMQExecutor(worker.endpoint) as ex:
        before = {pid for _, pid in (f.result(timeout=30) for f in [ex.submit(sleep_then_whoami, 0.3) for _ in range(2)])}
        neighbour = ex.submit(sleep_then_whoami, 1.0)
        error = ex.submit(fn, *args).exception(timeout=30)
        assert isinstance(error, TaskCrashedError) and isinstance(error, BrokenProcessPool)
        assert expect in str(error)
        assert error.endpoint == worker.endpoint and error.pid in before and error.host
        assert neighbour.result(timeout=30)[0] == worker.pid
        after = {f.result(timeout=30)[1] for f in [ex.submit(sleep_then_whoami, 0.3) for _ in range(4)]}
        assert len(after) == 2 and error.pid not in after
    assert "replacing it" in worker.log()


def exit_at(x: int, fatal: int) -> int:
    if x == fatal:
        os._exit(9)
    return x


def test_a_crash_amid_a_batch_fails_only_the_task_that_crashed(start_worker) -> None:
    worker = start_worker(processes=1)
    with ZMQExecutor(worker.endpoint) as ex:
        # Short tasks: the worker learns it and queues many in its one task process at a time.
        assert list(ex.map(abs, range(3000))) == list(range(3000))
        futures = [ex.submit(exit_at, i, 500) for i in range(1000)]
        errors = [f.exception(timeout=60) for f in futures]
        assert [i for i, e in enumerate(errors) if e is not None] == [500]
        assert isinstance(errors[500], TaskCrashedError) and "exited with code 9" in str(errors[500])
        # Those queued behind it never started and ran elsewhere; those it finished lost only their
        # replies and ran again; none failed.
        assert all(f.result() == i for i, f in enumerate(futures) if i != 500)
        assert ex.workers()[0].lost == 0
    assert "replacing it" in worker.log()


def test_worker_stops_cleanly_on_sigterm_and_sigint(start_worker) -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        worker = start_worker(processes=2)
        with ZMQExecutor(worker.endpoint) as ex:
            assert ex.submit(abs, -1).result(timeout=30) == 1
        task_pids = children_of(worker.pid)
        assert len(task_pids) >= 2
        worker.process.send_signal(signum)
        assert worker.process.wait(15) == 0
        assert wait_until(lambda: not any(alive(p) for p in task_pids))
        assert "worker stopped" in worker.log()


def test_task_processes_die_with_a_killed_worker(start_worker) -> None:
    worker = start_worker(processes=2)
    assert wait_until(lambda: len(children_of(worker.pid)) >= 2)
    task_pids = children_of(worker.pid)
    worker.process.kill()
    worker.process.wait(10)
    assert wait_until(lambda: not any(alive(p) for p in task_pids))


@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://10.1.2.3:5555", "tcp://eth0:5555"])
def test_worker_refuses_non_loopback_tcp(endpoint) -> None:
    out = subprocess.run([sys.executable, "-m", "zmqexecutor", "worker", "--bind", endpoint],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert f"refusing to bind {endpoint}" in out.stderr and "SSH tunnel" in out.stderr


def test_worker_reports_a_port_in_use(start_worker) -> None:
    first = start_worker(processes=1)
    out = subprocess.run([sys.executable, "-m", "zmqexecutor", "worker", "--bind", first.endpoint, "--processes", "1"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and f"cannot bind {first.endpoint}" in out.stderr


def test_worker_reports_a_metrics_port_in_use() -> None:
    pytest.importorskip("prometheus_client")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "zmqexecutor", "worker", "--bind", "tcp://127.0.0.1:*",
                              "--processes", "1", "--metrics-port", str(port), "--metrics-address", "127.0.0.1"],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("argv, message", [
    (["worker"], "one of the arguments --bind --connect is required"),
    (["worker", "--bind", "tcp://127.0.0.1:1", "--processes", "0"], "must be at least 1"),
    (["worker", "--bind", "nonsense"], "malformed endpoint 'nonsense'"),
])
def test_cli_usage_errors(argv, message) -> None:
    out = subprocess.run([sys.executable, "-m", "zmqexecutor", *argv], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and message in out.stderr


def test_an_endpoint_that_never_comes_up_fails_after_connect_timeout(tcp_endpoint) -> None:
    with ZMQExecutor(tcp_endpoint, connect_timeout=1.0) as ex:
        started = time.monotonic()
        future = ex.submit(abs, 1)
        error = future.exception(timeout=30)
        assert isinstance(error, NoWorkersError) and tcp_endpoint in str(error)
        assert 0.9 <= time.monotonic() - started < 5


_UNREACHABLE_SCRIPT = '''
import sys, time
from zmqexecutor import ZMQExecutor

with ZMQExecutor(sys.argv[1:], connect_timeout=20) as ex:
    futures = [ex.submit(abs, -i) for i in range(4)]
    time.sleep(7)
    print([w.error for w in ex.workers()])
    print(sorted(f.result() for f in futures))
'''


@pytest.mark.slow  # timers and connection probes, the same on every Python
def test_an_unreachable_endpoint_is_named_early_with_its_reason(tmp_path, tcp_endpoint, start_worker) -> None:
    good = start_worker(processes=1)
    script = tmp_path / "script.py"
    script.write_text(_UNREACHABLE_SCRIPT)
    # No logging set up, as in a first script: the warning still shows, naming the endpoint and why.
    out = subprocess.run([sys.executable, str(script), good.endpoint, tcp_endpoint], capture_output=True,
                         text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr
    assert f"cannot reach worker {tcp_endpoint} after" in out.stderr
    assert "connection refused" in out.stderr and good.endpoint not in out.stderr
    errors, results = out.stdout.splitlines()
    assert errors == "[None, 'connection refused (nothing listens there)']"
    assert results == "[0, 1, 2, 3]"


@pytest.mark.slow  # timers and connection probes, the same on every Python
def test_the_final_error_says_why_no_worker_was_reachable(tmp_path) -> None:
    missing = tmp_path / "nothing-here"
    with ZMQExecutor(f"ipc://{missing}", connect_timeout=6) as ex:
        error = ex.submit(abs, 1).exception(timeout=30)
    assert isinstance(error, NoWorkersError)
    assert f"ipc://{missing}: no socket file at {missing} (no worker is bound there)" in str(error)


def test_a_worker_started_late_is_used(tcp_endpoint, start_worker) -> None:
    with ZMQExecutor(tcp_endpoint, connect_timeout=30) as ex:
        future = ex.submit(whoami)
        time.sleep(0.5)
        assert not future.done()
        worker = start_worker(tcp_endpoint, processes=1)
        assert future.result(timeout=30)[0] == worker.pid


# --- handshake and version mismatch, with a raw socket on the other side --------------------------


def test_client_refuses_a_worker_with_other_versions(tcp_endpoint) -> None:
    context = zmq.Context()
    fake = context.socket(zmq.ROUTER)
    fake.bind(tcp_endpoint)
    try:
        with ZMQExecutor(tcp_endpoint, connect_timeout=30, insecure=True) as ex:  # a plain fake worker
            future = ex.submit(abs, 1)
            assert fake.poll(10_000)
            client, *frames = fake.recv_multipart()
            assert proto.decode_header(frames[0]).kind == Kind.HELLO
            hello, _ = proto.decode_hello(frames)
            welcome = dict(proto.local_versions(), python="3.99", cloudpickle="0.0.0", slots=2,
                           instance="x", accepted=True, reason=None)
            fake.send_multipart([client, *proto.encode_welcome(welcome)])
            error = future.exception(timeout=30)
            assert isinstance(error, VersionMismatchError)
            text = str(error)
            assert f"python {hello['python']} on client vs 3.99 on worker {tcp_endpoint}" in text
            assert f"cloudpickle {hello['cloudpickle']} on client vs 0.0.0" in text
            assert not fake.poll(300)  # no task was sent
    finally:
        fake.close(0)
        context.term()


def test_status_says_a_worker_this_python_cannot_use_is_not_ok(tcp_endpoint) -> None:
    context = zmq.Context()
    fake = context.socket(zmq.ROUTER)
    fake.bind(tcp_endpoint)

    def answer() -> None:
        if fake.poll(30_000):
            client, *_ = fake.recv_multipart()
            reply = dict(proto.local_versions(), python="3.99", slots=1, security="none")
            fake.send_multipart([client, proto.encode_header(Kind.STATUS_REPLY), proto.encode_json(reply)])

    answering = threading.Thread(target=answer)
    answering.start()
    try:
        out = subprocess.run([sys.executable, "-m", "zmqexecutor", "status", tcp_endpoint, "--timeout", "20",
                              "--insecure"],
                             capture_output=True, text=True, timeout=60)
    finally:
        answering.join()
        fake.close(0)
        context.term()
    assert out.returncode == 1
    assert f"{tcp_endpoint}  INCOMPATIBLE (python " in out.stdout and "vs 3.99 on worker" in out.stdout
    assert "  ok  " not in out.stdout


def test_worker_refuses_a_client_with_other_versions(start_worker) -> None:
    worker = start_worker(processes=1, extra=["--insecure"])  # plain text: a raw client speaks to it
    with raw_dealer(worker.endpoint) as client:
        hello = dict(proto.local_versions(), python="3.99", cloudpickle="0.0.0")
        client.send_multipart(proto.encode_hello(hello, b""))
        assert client.poll(10_000)
        welcome = proto.decode_welcome(client.recv_multipart())
        assert welcome["accepted"] is False
        assert f"python {proto.local_versions()['python']} on worker vs 3.99 on client" in welcome["reason"]
        # A task without an accepted handshake is refused, never run.
        client.send_multipart([proto.encode_header(Kind.TASK, 5), *proto.encode_call(os.getpid, (), {})])
        assert client.poll(10_000)
        frames = client.recv_multipart()
        assert proto.decode_header(frames[0]) == proto.Header(Kind.REJECTED, 5)


def test_worker_answers_another_protocol_version_with_a_clear_refusal(start_worker) -> None:
    worker = start_worker(processes=1, extra=["--insecure"])  # plain text: a raw client speaks to it
    with raw_dealer(worker.endpoint) as client:
        client.send_multipart([b"ZX\x63\x01" + bytes(8), b"{}", b""])  # protocol version 99
        assert client.poll(10_000)
        welcome = proto.decode_welcome(client.recv_multipart())
        assert welcome["accepted"] is False
        assert f"protocol {proto.PROTOCOL_VERSION} on worker vs 99 on client" in welcome["reason"]
        # Garbage does not hurt the worker.
        client.send_multipart([b"garbage"])
        client.send(b"")
        with ZMQExecutor(worker.endpoint, insecure=True) as ex:
            assert ex.submit(abs, -6).result(timeout=30) == 6
        assert worker.process.poll() is None


# --- zmqexecutor status / ping --------------------------------------------------------------------


def _default_process_count(prefix: list[str]) -> int:
    worker = subprocess.Popen([*prefix, sys.executable, "-m", "zmqexecutor", "worker", "--bind", "tcp://127.0.0.1:*"],
                              stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert worker.stderr is not None
        for line in worker.stderr:
            ready = re.search(r"worker ready: .* processes=(\d+) ", line)
            if ready:
                return int(ready.group(1))
        raise AssertionError("the worker exited before it was ready")
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0


def test_the_default_process_count_stays_within_a_cgroup_cpu_quota() -> None:
    cpu = Path("/sys/fs/cgroup/cpu")
    if os.geteuid() != 0 or not (cpu / "cpu.cfs_quota_us").exists():
        pytest.skip("needs root and a cgroup v1 cpu controller")
    if not _features.PROC:
        pytest.skip("portable mode: no cgroup quotas are read (as on macOS)")
    uncapped = _default_process_count([])
    assert uncapped == len(os.sched_getaffinity(0))
    if uncapped < 2:
        pytest.skip("one CPU: a quota of half of it changes nothing")
    group = cpu / f"zxtest{os.getpid()}"
    try:
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot make a cgroup here: {exc}")
    try:
        (group / "cpu.cfs_quota_us").write_text(str(int((group / "cpu.cfs_period_us").read_text()) // 2))
        # As in a container started with --cpus 0.5: the worker runs one task process, not one per CPU.
        join = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$0" "$@"']
        assert _default_process_count(join) == 1
    finally:
        assert wait_until(lambda: not (group / "cgroup.procs").read_text().strip(), timeout=10)
        group.rmdir()


def test_status_and_ping_report_each_worker(start_worker, tcp_endpoint) -> None:
    worker = start_worker(processes=2)
    with ZMQExecutor(worker.endpoint) as ex:
        assert [f.result(timeout=30) for f in [ex.submit(abs, -i) for i in range(3)]] == [0, 1, 2]
        assert isinstance(ex.submit(os._exit, 3).exception(timeout=30), TaskCrashedError)
        ex.submit(divmod, 1, 0).exception(timeout=30)
        out = subprocess.run([sys.executable, "-m", "zmqexecutor", "status", worker.endpoint],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    # No keys given, on loopback: this user's own key store secures the link.
    assert f"{worker.endpoint}  ok" in out.stdout and "security CurveZMQ" in out.stdout
    assert f"pid {worker.pid}" in out.stdout and "slots 2" in out.stdout and "clients 1" in out.stdout
    assert "tasks done 3  failed 1  crashed 1" in out.stdout
    ping = subprocess.run([sys.executable, "-m", "zmqexecutor", "ping", worker.endpoint, tcp_endpoint,
                           "--timeout", "1"], capture_output=True, text=True, timeout=60)
    assert ping.returncode == 1
    assert re.search(rf"{re.escape(worker.endpoint)}  ok  [\d.]+ ms", ping.stdout)
    assert f"{tcp_endpoint}  unreachable: no answer within 1 s" in ping.stdout


@pytest.mark.slow  # waits out a refused handshake
def test_status_of_a_secured_worker_needs_the_keys(start_worker, keys) -> None:
    worker = start_worker("tcp://127.0.0.1:*", processes=1, extra=["--keys", str(keys / "worker")])
    base = [sys.executable, "-m", "zmqexecutor", "status", worker.endpoint, "--timeout", "2"]
    secured = subprocess.run([*base, "--keys", str(keys / "client")], capture_output=True, text=True, timeout=60)
    assert secured.returncode == 0 and "security CurveZMQ" in secured.stdout
    plain = subprocess.run(base, capture_output=True, text=True, timeout=60, env={**os.environ, "ZMQEXECUTOR_KEYS": ""})
    assert plain.returncode == 1 and "unreachable: the secure handshake failed" in plain.stdout


# --- what a user sees when a task fails remotely ------------------------------------------------------

_TRACEBACK_SCRIPT = '''import sys
from zmqexecutor import ZMQExecutor

def inner(x):
    return 1 / x

def task(x):
    return inner(x) + 1

with ZMQExecutor(sys.argv[1], max_workers=1) as ex:
    ex.submit(task, 0).result()
'''


def test_a_remote_traceback_names_the_scripts_file_lines_and_source(tmp_path, start_worker) -> None:
    worker = start_worker(processes=1)
    script = tmp_path / "script.py"
    script.write_text(_TRACEBACK_SCRIPT)
    out = subprocess.run([sys.executable, str(script), worker.endpoint], capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 1 and "ZeroDivisionError" in out.stderr
    assert "<dynamic-code>" not in out.stderr
    assert f'File "{script}", line 8, in task\n    return inner(x) + 1\n' in out.stderr
    assert f'File "{script}", line 5, in inner\n    return 1 / x\n' in out.stderr


_MISSING_MODULE_SCRIPT = '''import sys
import cloudpickle
import helpers
from zmqexecutor import ZMQExecutor

with ZMQExecutor(sys.argv[1], max_workers=1) as ex:
    try:
        ex.submit(helpers.double, 2).result()
    except ModuleNotFoundError as exc:
        print("\\n".join(getattr(exc, "__notes__", [])) or exc.__cause__)
    cloudpickle.register_pickle_by_value(helpers)  # the fix the note suggests
    print(ex.submit(helpers.double, 2).result())
'''


def test_a_module_only_beside_the_script_fails_remotely_with_the_fix_in_the_error(tmp_path, start_worker) -> None:
    worker = start_worker(processes=1)
    (tmp_path / "helpers.py").write_text("def double(x):\n    return 2 * x\n")
    script = tmp_path / "script.py"
    script.write_text(_MISSING_MODULE_SCRIPT)
    out = subprocess.run([sys.executable, str(script), worker.endpoint], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr
    note, result = out.stdout.strip().rsplit("\n", 1)
    assert "loading the task failed on host" in note and "module 'helpers' is not importable there" in note
    assert "cloudpickle.register_pickle_by_value(helpers)" in note
    assert result == "4"


def test_an_array_inside_a_maps_callable_reaches_a_relayed_worker_and_is_decoded_once(start_worker) -> None:
    from test_executor import Rebuilt, decoded_and_first

    worker = start_worker(processes=2)
    data = numpy.arange(500_000, dtype=numpy.float64)
    with ZMQExecutor(worker.endpoint) as ex:
        results = list(ex.map(functools.partial(decoded_and_first, Rebuilt(data)), range(20)))
    assert [value for _, value in results] == [float(x) for x in range(20)]
    assert {decoded for decoded, _ in results} == {1}


def kept_counts(endpoint: str) -> tuple[int, int, int]:
    out = subprocess.run([sys.executable, "-m", "zmqexecutor", "status", endpoint], capture_output=True,
                         text=True, timeout=60).stdout
    found = re.search(r"(\d+) buffer\(s\) received, (\d+) reused, (\d+) missing", out)
    assert found is not None, out
    received, reused, missing = map(int, found.groups())
    return received, reused, missing


def kept_mib(endpoint: str) -> float:
    out = subprocess.run([sys.executable, "-m", "zmqexecutor", "status", endpoint], capture_output=True,
                         text=True, timeout=60).stdout
    found = re.search(r"kept ([0-9.]+) of", out)
    assert found is not None, out
    return float(found.group(1))


def test_a_worker_keeps_an_array_a_map_sends_with_every_task_and_gets_it_once(start_worker) -> None:
    from test_executor import first_plus_value

    worker = start_worker(processes=2)
    data = numpy.arange(1_000_000, dtype=numpy.float64)  # 8 MB
    with ZMQExecutor(worker.endpoint) as ex:
        assert list(ex.map(functools.partial(first_plus_value, data), range(20))) == [float(x) for x in range(20)]
        assert kept_counts(worker.endpoint) == (1, 19, 0)
        data[0] = 1000.0  # changed in place: another buffer, sent once more
        assert list(ex.map(functools.partial(first_plus_value, data), range(5))) == [1000.0 + x for x in range(5)]
        assert kept_counts(worker.endpoint) == (2, 23, 0)
        assert kept_mib(worker.endpoint) == round(2 * data.nbytes / 2**20, 1)  # both contents, until it ends
    assert wait_until(lambda: kept_mib(worker.endpoint) == 0.0, 10)  # the session ended: let go


def test_a_worker_keeps_an_array_passed_to_every_task_of_a_map_from_the_second_on(start_worker) -> None:
    from test_executor import first_plus_value

    worker = start_worker(processes=2)
    data = numpy.arange(1_000_000, dtype=numpy.float64)  # 8 MB
    with ZMQExecutor(worker.endpoint) as ex:
        # The first task sends it plainly (a one-off argument costs no digest), the second asks the
        # worker to keep it, the rest name it.
        assert list(ex.map(first_plus_value, itertools.repeat(data, 20), range(20))) == [float(x) for x in range(20)]
        assert kept_counts(worker.endpoint) == (1, 18, 0)
        data[0] = 1000.0  # changed in place between maps: hashed again, a new buffer, sent once
        assert list(ex.map(first_plus_value, itertools.repeat(data, 5), range(5))) == [1000.0 + x for x in range(5)]
        assert kept_counts(worker.endpoint) == (2, 22, 0)


def test_submit_hashes_a_repeated_argument_every_time_so_a_change_always_arrives(start_worker) -> None:
    from test_executor import first_plus_value

    worker = start_worker(processes=1)
    data = numpy.zeros(1_000_000)
    with ZMQExecutor(worker.endpoint) as ex:
        for value in range(4):
            data[0] = value
            assert ex.submit(first_plus_value, data, 0).result(timeout=60) == value
        assert kept_counts(worker.endpoint) == (3, 0, 0)
        assert [ex.submit(first_plus_value, data, x).result(timeout=60) for x in range(3)] == [3.0, 4.0, 5.0]
        assert kept_counts(worker.endpoint) == (3, 3, 0)


def test_with_send_once_off_every_task_carries_everything_and_the_worker_keeps_nothing(start_worker) -> None:
    from test_executor import first_plus_value

    worker = start_worker(processes=1)
    data = numpy.ones(1_000_000)
    with pytest.raises(TypeError, match="send_once must be True or False"):
        ZMQExecutor(worker.endpoint, send_once="no")  # type: ignore[arg-type]
    with ZMQExecutor(worker.endpoint, send_once=False) as ex:
        assert list(ex.map(functools.partial(first_plus_value, data), range(5))) == [1.0 + x for x in range(5)]
        assert list(ex.map(first_plus_value, [data] * 5, range(5))) == [1.0 + x for x in range(5)]
    assert kept_counts(worker.endpoint) == (0, 0, 0)


def test_a_shared_object_crosses_to_a_worker_once_and_is_decoded_once_per_process(start_worker) -> None:
    from test_executor import Rebuilt, decoded_first_of

    worker = start_worker(processes=2)
    with ZMQExecutor(worker.endpoint) as ex:
        shared = ex.share(Rebuilt({"rows": list(range(300_000)), "first": 2.0}))
        results = list(ex.map(decoded_first_of, [shared] * 20, range(20)))
        assert [value for _, value in results] == [2.0 + x for x in range(20)]
        assert {decoded for decoded, _ in results} == {1}
        assert kept_counts(worker.endpoint) == (1, 19, 0)  # named from the first task on
        # Inside the callable, and by submit, it is the same kept pickle.
        assert ex.submit(functools.partial(decoded_first_of, shared), 1).result(timeout=60) == (1, 3.0)
        assert kept_counts(worker.endpoint) == (1, 20, 0)


def test_a_worker_restarted_on_the_same_endpoint_gets_the_buffers_it_kept_again(start_worker) -> None:
    from test_executor import first_plus_value

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    first = start_worker(endpoint, processes=1)
    data = numpy.ones(1_000_000)
    with ZMQExecutor(endpoint, worker_timeout=1.0, max_retries=0) as ex:
        fn = functools.partial(first_plus_value, data)
        assert list(ex.map(fn, range(5))) == [1.0 + x for x in range(5)]
        assert list(ex.map(first_plus_value, [data] * 5, range(5))) == [1.0 + x for x in range(5)]
        first.process.kill()
        first.process.wait()
        second = start_worker(endpoint, processes=1)
        # A new session keeps nothing yet: each buffer goes once more, and no task fails for it.
        assert list(ex.map(fn, range(5))) == [1.0 + x for x in range(5)]
        assert list(ex.map(first_plus_value, [data] * 5, range(5))) == [1.0 + x for x in range(5)]
        received, reused, missing = kept_counts(second.endpoint)
        assert received == 1 and reused == 9 and missing == 0  # one array: the callable's and the arguments'


@pytest.mark.skipif(not _features.MEMFD, reason="no memfd here: kept buffers go as copies")
def test_task_processes_map_the_one_copy_the_worker_keeps_and_write_only_their_own(start_worker) -> None:
    from test_executor import mapped_first_then_changed

    worker = start_worker(processes=2)
    data = numpy.ones(1_000_000)
    with ZMQExecutor(worker.endpoint) as ex:
        results = list(ex.map(mapped_first_then_changed, [data] * 12, range(12)))
    assert [value for _, value in results] == [1.0 + x for x in range(12)]
    assert all(mapped for mapped, _ in results[2:])  # from the second task, kept: mapped, not copied
    assert kept_counts(worker.endpoint) == (1, 10, 0)


@pytest.mark.skipif(not _features.MEMFD, reason="no memfd here: kept buffers go as copies")
def test_tasks_still_run_where_task_processes_cannot_map_what_the_worker_keeps(tmp_path) -> None:
    # Every task naming a kept buffer is answered MISSING there; after a few, the client sends it plainly.
    from conftest import TESTS

    path = os.pathsep.join([str(TESTS / "noprocfd"), str(TESTS), str(ROOT)])
    worker = subprocess.Popen([sys.executable, "-m", "zmqexecutor", "worker", "--bind", "tcp://127.0.0.1:0",
                               "--processes", "2"], stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=path))
    try:
        assert worker.stderr is not None
        line = ""
        while "worker ready" not in line:
            line = worker.stderr.readline()
            assert line, "the worker ended"
        endpoint = line.split("ready: ", 1)[1].split("=", 1)[1].split()[0]
        from test_executor import first_plus_value

        data = numpy.ones(1_000_000)
        with ZMQExecutor(endpoint, max_retries=0) as ex:
            assert list(ex.map(functools.partial(first_plus_value, data), range(8))) == [1.0 + x for x in range(8)]
            assert list(ex.map(first_plus_value, [data] * 8, range(8))) == [1.0 + x for x in range(8)]
        received, reused, missing = kept_counts(endpoint)
        assert missing == 0 and received >= 1  # the worker kept it; its processes could not map it
    finally:
        worker.send_signal(signal.SIGINT)
        worker.wait(30)


def test_a_worker_that_let_a_buffer_go_gets_it_again_and_the_task_still_runs(start_worker) -> None:
    from test_executor import first_plus_value

    worker = start_worker(processes=1, extra=["--cache-size", "10MB"])
    first, second = numpy.zeros(1_000_000), numpy.ones(1_000_000)  # 8 MB each: one fits
    with ZMQExecutor(worker.endpoint, max_retries=0) as ex:
        for data, value in [(first, 0.0), (second, 1.0), (first, 0.0)]:
            assert list(ex.map(functools.partial(first_plus_value, data), range(3))) == [value + x for x in range(3)]
    received, reused, missing = kept_counts(worker.endpoint)
    assert received == 3 and missing >= 1 and reused >= 4  # the first array's was let go for the second


def test_a_worker_that_keeps_nothing_still_runs_every_task(start_worker) -> None:
    from test_executor import first_plus_value

    worker = start_worker(processes=1, extra=["--cache-size", "0"])
    with ZMQExecutor(worker.endpoint) as ex:
        data = numpy.ones(500_000)
        assert list(ex.map(functools.partial(first_plus_value, data), range(4))) == [1.0 + x for x in range(4)]
    assert kept_counts(worker.endpoint) == (0, 0, 0)


def raises_value_error(x: int) -> int:
    raise ValueError(x)


def test_status_json_is_one_document_that_agrees_with_what_the_executor_sees(start_worker) -> None:
    import json

    worker = start_worker(processes=2, extra=["--resources", "gpu=1"])
    nobody = f"tcp://127.0.0.1:{free_port()}"
    with ZMQExecutor([worker.endpoint]) as ex:
        assert list(ex.map(abs, [-1, -2, -3])) == [1, 2, 3]
        with pytest.raises(ValueError):
            ex.submit(raises_value_error, 1).result(timeout=30)
        (seen,) = ex.workers()
        done = subprocess.run([sys.executable, "-m", "zmqexecutor", "status", "--json", "--timeout", "2",
                               worker.endpoint, nobody], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1  # one of the two did not answer
    document = json.loads(done.stdout)
    assert document["schema_version"] == 1 and document["command"] == "status"
    answered, silent = document["workers"]
    assert answered["endpoint"] == worker.endpoint and answered["state"] == "ready" and answered["error"] is None
    assert (answered["host"], answered["pid"], answered["instance"], answered["slots"]) == \
        (seen.host, seen.pid, seen.instance, seen.slots)
    assert answered["resources"] == seen.resources == {"gpu": 1.0}
    assert answered["tasks"]["done"] == 3 and answered["tasks"]["failed"] == 1
    assert answered["clients"] == 1 and answered["round_trip_ms"] > 0
    assert set(answered["versions"]) == {"zmqexecutor", "python", "cloudpickle", "protocol"}
    assert set(answered["cache"]) >= {"kept_bytes", "budget_bytes", "received", "reused", "missing", "refused"}
    assert silent == {"endpoint": nobody, "state": "unreachable", "error": "no answer within 2 s"}
    ping = subprocess.run([sys.executable, "-m", "zmqexecutor", "ping", "--json", worker.endpoint],
                          capture_output=True, text=True, timeout=60)
    assert ping.returncode == 0 and json.loads(ping.stdout)["workers"][0]["state"] == "ready"


def test_a_worker_logs_json_lines_with_its_endpoint_and_the_client_and_task_they_concern(start_worker) -> None:
    import json

    worker = start_worker(processes=1, extra=["--log-format", "json"])
    with ZMQExecutor([worker.endpoint], max_retries=0) as ex:
        with pytest.raises(BrokenProcessPool):
            ex.submit(os._exit, 3).result(timeout=30)
    assert wait_until(lambda: "dropped its session" in worker.log(), timeout=15)
    lines = [json.loads(line) for line in worker.log().splitlines()]  # every line is one object
    assert all({"time", "level", "logger", "message", "host", "pid", "endpoint"} <= set(line) for line in lines)
    assert all(line["pid"] == worker.pid for line in lines)
    connected = next(line for line in lines if "connected" in line["message"])
    crashed = next(line for line in lines if "went with task process" in line["message"])
    assert connected["level"] == "INFO" and connected["client"].startswith("zx-")
    assert crashed["client"] == connected["client"] and isinstance(crashed["task"], int)
    assert next(line for line in lines if "worker ready" in line["message"])["endpoint"] == "tcp://127.0.0.1:*"


def nap_for(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_a_worker_serves_prometheus_metrics_during_and_after_a_map(start_worker) -> None:
    import re as regex
    import urllib.request

    parser = pytest.importorskip("prometheus_client.parser")
    worker = start_worker(processes=2, extra=["--metrics-port", "0", "--metrics-address", "127.0.0.1",
                                              "--resources", "gpu=1"])
    assert wait_until(lambda: "Prometheus metrics at" in worker.log(), timeout=15)
    url = regex.search(r"Prometheus metrics at (http://\S+)", worker.log()).group(1)

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in parser.text_string_to_metric_families(text) for sample in family.samples}

    with ZMQExecutor([worker.endpoint]) as ex:
        results = ex.map(nap_for, [0.3] * 8)
        assert wait_until(lambda: scrape()[("zmqexecutor_slots", (("state", "busy"),))] == 2, timeout=15)
        during = scrape()
        assert during[("zmqexecutor_clients", ())] == 1
        assert during[("zmqexecutor_queued_tasks", ())] + during[("zmqexecutor_slots", (("state", "busy"),))] >= 2
        assert list(results) == [0.3] * 8
        with pytest.raises(ValueError):
            ex.submit(raises_value_error, 2).result(timeout=30)
        assert wait_until(lambda: scrape()[("zmqexecutor_tasks_total", (("outcome", "failed"),))] == 1, timeout=15)
        after = scrape()
    assert after[("zmqexecutor_tasks_total", (("outcome", "done"),))] == 8
    assert after[("zmqexecutor_task_duration_seconds_count", ())] == 9
    assert 8 * 0.3 <= after[("zmqexecutor_task_duration_seconds_sum", ())] < 30
    assert after[("zmqexecutor_task_duration_seconds_bucket", (("le", "0.1"),))] == 1  # the failed one was quick
    assert after[("zmqexecutor_received_bytes_total", ())] > 0 and after[("zmqexecutor_sent_bytes_total", ())] > 0
    assert after[("zmqexecutor_resources", (("name", "gpu"),))] == 1.0
    assert after[("zmqexecutor_uptime_seconds", ())] > 0
    info = next(labels for (name, labels) in after if name == "zmqexecutor_worker_info")
    assert dict(info)["host"] == socket.gethostname()


def test_a_worker_tells_the_client_how_long_its_tasks_take(start_worker) -> None:
    worker = start_worker(processes=1)
    with ZMQExecutor([worker.endpoint]) as ex:
        ex.wait_for_workers(1, timeout=30)
        assert ex.workers()[0].task_seconds is None  # nothing ran yet
        assert list(ex.map(nap_for, [0.03] * 6)) == [0.03] * 6
        # Measured by the worker (PACE), from when its process began each task to its reply.
        assert 0.03 <= ex.workers()[0].task_seconds < 0.3


def test_a_client_serves_its_own_metrics_on_request(start_worker) -> None:
    import urllib.request

    parser = pytest.importorskip("prometheus_client.parser")
    from zmqexecutor.metrics import serve_metrics

    worker = start_worker(processes=2)
    with ZMQExecutor([worker.endpoint, f"tcp://127.0.0.1:{free_port()}"]) as ex:
        url = serve_metrics(ex)
        assert list(ex.map(nap_for, [0.05] * 6)) == [0.05] * 6
        text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in parser.text_string_to_metric_families(text) for sample in family.samples}
    assert samples[("zmqexecutor_client_submitted_tasks_total", ())] == 6
    assert samples[("zmqexecutor_client_in_flight_tasks", ())] == 0
    assert samples[("zmqexecutor_client_retried_tasks_total", ())] == 0
    assert samples[("zmqexecutor_client_workers", (("state", "ready"),))] == 1
    assert samples[("zmqexecutor_client_workers", (("state", "connecting"),))] == 1  # nothing listens there
    assert samples[("zmqexecutor_client_slots", ())] == 2
    assert samples[("zmqexecutor_client_round_trip_seconds_count", ())] == 6
    assert samples[("zmqexecutor_client_round_trip_seconds_bucket", (("le", "0.01"),))] == 0  # each slept 50 ms
    assert 6 * 0.05 <= samples[("zmqexecutor_client_round_trip_seconds_sum", ())] < 10
