"""Real faults: killed, stopped, restarted and partitioned workers, killed clients, poison tasks.

Every test checks that each future reaches a final state exactly once within a bound, and that no
I/O thread or process of ours is left behind.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import (
    ROOT,
    WorkerProcess,
    alive,
    children_of,
    free_port,
    local_worker_pid,
    state_of,
    wait_until,
)

from zmqexecutor import (
    BrokenWorkerPool,
    NoWorkersError,
    TaskCrashedError,
    WorkerLostError,
    ZMQExecutor,
)
from zmqexecutor._wire import _features

# Run once, on the default interpreter; .ci/run skips these on the other Pythons (see pyproject.toml).
pytestmark = pytest.mark.slow

FAST = {"worker_timeout": 1.0, "connect_timeout": 20}


def sleep_then_whoami(seconds: float, tag: object = None) -> tuple[int, int, object]:
    time.sleep(seconds)
    return os.getppid(), os.getpid(), tag


def both_ready(executor: ZMQExecutor) -> None:
    """Until both local task processes run tasks: spawned (portable mode, macOS) they start a second
    apart, and a long task given to the first before the second is up waits behind the one it runs."""
    assert wait_until(lambda: len({pid for _, pid, _ in executor.map(sleep_then_whoami, [0.1] * 4)}) == 2,
                      timeout=30)


def mark_then_sleep(marker: str, seconds: float) -> int:
    open(marker, "w").close()
    time.sleep(seconds)
    return os.getpid()


def kill_my_worker() -> None:
    os.kill(os.getppid(), signal.SIGKILL)
    time.sleep(10)


def busy_loop(seconds: float) -> int:
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:  # pure Python: holds the GIL of the task process
        n += 1
    return n


class Resolutions:
    """Counts how often each future is resolved."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[int, int] = {}

    def track(self, futures: list[cf.Future]) -> list[cf.Future]:
        for future in futures:
            future.add_done_callback(self._done)
        return futures

    def _done(self, future: cf.Future) -> None:
        with self.lock:
            self.counts[id(future)] = self.counts.get(id(future), 0) + 1

    def assert_exactly_once(self, futures: list[cf.Future]) -> None:
        assert all(self.counts.get(id(f)) == 1 for f in futures), self.counts


@pytest.fixture(autouse=True)
def no_second_outcome(caplog):
    """The engine logs (as an error) any outcome for a task whose future already had one: a Future
    refuses a second one silently, so the callbacks of ``Resolutions`` alone could not see it."""
    yield
    seconds = [r.getMessage() for r in caplog.records if "a second one" in r.getMessage()]
    assert not seconds, seconds


def io_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "zmqexecutor-io"]


@pytest.fixture(autouse=True)
def nothing_left_behind():
    before = children_of(os.getpid())
    yield
    assert wait_until(lambda: not io_threads(), timeout=15), io_threads()
    # Workers the test started are stopped by their fixture after this check, so only count new
    # processes that are not workers or their task processes.
    leftover = children_of(os.getpid()) - before
    workers = {p for p in leftover if "zmqexecutor" in _cmdline(p) and "worker" in _cmdline(p)}
    task_processes = {p for w in workers for p in children_of(w)}
    assert wait_until(lambda: not ((children_of(os.getpid()) - before) - workers - task_processes), timeout=10)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def stop_processes(pids: set[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


# --- a worker dies --------------------------------------------------------------------------------


def test_a_worker_killed_in_the_middle_of_a_map_loses_no_result(start_worker, caplog) -> None:
    workers = [start_worker(processes=1) for _ in range(3)]
    victim = workers[0]
    seen = Resolutions()
    with ZMQExecutor([w.endpoint for w in workers], **FAST) as ex:
        assert wait_until(lambda: all(w.state == "ready" for w in ex.workers()))
        tracked = seen.track([ex.submit(sleep_then_whoami, 0.3, i) for i in range(6)])
        killer = threading.Timer(0.5, victim.process.kill)
        killer.start()
        started = time.monotonic()
        results = list(ex.map(sleep_then_whoami, [0.1] * 30, range(30)))
        killer.join()
        assert [tag for _, _, tag in results] == list(range(30))
        assert [f.result(timeout=30)[2] for f in tracked] == list(range(6))
        assert time.monotonic() - started < 20
    assert victim.process.poll() is not None
    assert re.search(rf"lost worker {re.escape(victim.endpoint)} \(the connection closed\) with [1-9]\d* task", caplog.text)
    assert {parent for parent, _, _ in results} - {victim.pid}  # the others did the rest
    seen.assert_exactly_once(tracked)
    assert [w.lost for w in ex.workers()] == [1, 0, 0]


def test_a_stopped_worker_is_lost_then_its_late_results_are_ignored(start_worker, tmp_path) -> None:
    stopped, healthy = start_worker(processes=1), start_worker(processes=1)
    seen = Resolutions()
    with ZMQExecutor([stopped.endpoint, healthy.endpoint], **FAST) as ex:
        assert wait_until(lambda: all(w.state == "ready" for w in ex.workers()))
        futures = seen.track([ex.submit(sleep_then_whoami, 1.0, i) for i in range(4)])
        assert wait_until(lambda: [w.in_flight for w in ex.workers()] == [2, 2])  # two on each worker
        frozen = {stopped.pid} | children_of(stopped.pid)
        stop_processes(frozen, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            assert wait_until(lambda: state_of(ex, stopped.endpoint) != "ready", timeout=10)
            detected = time.monotonic() - stopped_at
            results = [f.result(timeout=30) for f in futures]
        finally:
            stop_processes(frozen, signal.SIGCONT)
        assert 0.9 <= detected < 3.0  # worker_timeout=1 plus up to a heartbeat
        assert {parent for parent, _, _ in results} == {healthy.pid}
        assert [tag for _, _, tag in results] == [0, 1, 2, 3]
        # The resumed worker finishes its old copies; their replies must change nothing.
        assert wait_until(lambda: state_of(ex, stopped.endpoint) == "ready", timeout=30)
        time.sleep(1.5)
        seen.assert_exactly_once(futures)
        assert all(f.result() == r for f, r in zip(futures, results))
        later = [f.result(timeout=30) for f in [ex.submit(sleep_then_whoami, 0.2) for _ in range(4)]]
        assert stopped.pid in {parent for parent, _, _ in later}


def test_a_worker_restarted_on_the_same_endpoint_is_used_again(start_worker) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    first = start_worker(endpoint, processes=1)
    seen = Resolutions()
    with ZMQExecutor(endpoint, **FAST) as ex:
        assert ex.submit(abs, -1).result(timeout=30) == 1
        instance = ex.workers()[0].instance
        futures = seen.track([ex.submit(sleep_then_whoami, 0.3, i) for i in range(6)])
        assert wait_until(lambda: ex.workers()[0].in_flight > 0)
        first.process.kill()
        first.process.wait()
        second = start_worker(endpoint, processes=1)
        results = [f.result(timeout=60) for f in futures]
        assert [tag for _, _, tag in results] == list(range(6))
        assert second.pid in {parent for parent, _, _ in results}
        assert ex.workers()[0].instance not in (None, instance)
    seen.assert_exactly_once(futures)


def test_when_every_worker_is_dead_futures_fail_in_bounded_time_then_recover(start_worker) -> None:
    workers = [start_worker(processes=1) for _ in range(2)]
    seen = Resolutions()
    with ZMQExecutor([w.endpoint for w in workers], worker_timeout=1.0, connect_timeout=2.0) as ex:
        assert ex.submit(abs, -1).result(timeout=30) == 1
        futures = seen.track([ex.submit(sleep_then_whoami, 0.5, i) for i in range(6)])
        assert wait_until(lambda: all(w.in_flight > 0 for w in ex.workers()))
        for worker in workers:
            worker.process.kill()
        started = time.monotonic()
        errors = [f.exception(timeout=30) for f in futures]
        assert all(isinstance(e, NoWorkersError) for e in errors), errors
        assert time.monotonic() - started < 6
        assert all(w.endpoint in str(errors[0]) for w in workers)
        # Usable again once a worker is back.
        revived = start_worker(workers[1].endpoint, processes=1)
        assert ex.submit(sleep_then_whoami, 0).result(timeout=30)[0] == revived.pid
    seen.assert_exactly_once(futures)


def test_a_poison_task_fails_after_max_retries_and_spares_the_rest(start_worker) -> None:
    workers = [start_worker(processes=1) for _ in range(3)]
    with ZMQExecutor([w.endpoint for w in workers], max_retries=1, **FAST) as ex:
        assert wait_until(lambda: all(w.state == "ready" for w in ex.workers()))
        error = ex.submit(kill_my_worker).exception(timeout=30)
        assert isinstance(error, WorkerLostError) and isinstance(error, cf.BrokenExecutor)
        assert len(error.endpoints) == 2 and len(set(error.endpoints)) == 2
        assert all(e in str(error) for e in error.endpoints)
        assert wait_until(lambda: sum(w.process.poll() is None for w in workers) == 1)
        survivors = [w for w in workers if w.process.poll() is None]
        assert len(survivors) == 1 and survivors[0].endpoint not in error.endpoints
        assert ex.submit(sleep_then_whoami, 0).result(timeout=30)[0] == survivors[0].pid


def test_max_retries_zero_gives_at_most_once(start_worker) -> None:
    worker = start_worker(processes=1)
    with ZMQExecutor(worker.endpoint, max_retries=0, connect_timeout=2.0, worker_timeout=1.0) as ex:
        future = ex.submit(sleep_then_whoami, 5)
        assert wait_until(future.running)
        time.sleep(0.3)
        worker.process.kill()
        error = future.exception(timeout=10)
        assert isinstance(error, WorkerLostError) and error.endpoints == (worker.endpoint,)


def test_a_long_gil_holding_task_does_not_look_like_a_dead_worker(start_worker) -> None:
    worker = start_worker(processes=1)
    with ZMQExecutor(worker.endpoint, max_retries=0, worker_timeout=0.5) as ex:
        assert ex.submit(busy_loop, 3.0).result(timeout=30) > 0


# --- a client dies --------------------------------------------------------------------------------


def test_a_killed_client_does_not_stop_the_worker_serving_others(start_worker, tmp_path) -> None:
    worker = start_worker(processes=1)
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, time
        from zmqexecutor import ZMQExecutor
        ex = ZMQExecutor({worker.endpoint!r}, worker_timeout=1.0)
        futures = [ex.submit(time.sleep, 0.5) for _ in range(20)]
        futures[0].result(timeout=30)
        os.kill(os.getpid(), signal.SIGKILL)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == -9
    started = time.monotonic()
    with ZMQExecutor(worker.endpoint) as ex:
        assert ex.submit(sleep_then_whoami, 0).result(timeout=30)[0] == worker.pid
    assert time.monotonic() - started < 8  # the dead client's session expires after 3 x its timeout
    assert wait_until(lambda: "was silent for 3 s; dropped its session" in worker.log(), timeout=10), worker.log()
    assert worker.process.poll() is None


# --- stopping work on purpose ---------------------------------------------------------------------


@pytest.mark.parametrize("method, signame", [("terminate_workers", "SIGTERM"), ("kill_workers", "SIGKILL")])
def test_terminate_and_kill_workers(method: str, signame: str, tmp_path) -> None:
    executor = ZMQExecutor(max_workers=2)
    worker_pid = local_worker_pid(executor)
    both_ready(executor)
    markers = [tmp_path / f"started{i}" for i in range(2)]
    running = [executor.submit(mark_then_sleep, str(m), 30) for m in markers]
    assert wait_until(lambda: all(m.exists() for m in markers), timeout=20)
    queued = [executor.submit(sleep_then_whoami, 30) for _ in range(5)]
    started = time.monotonic()
    getattr(executor, method)()
    errors = [f.exception(timeout=15) for f in running]
    assert all(isinstance(e, TaskCrashedError) and signame in str(e) for e in errors), errors
    # Queued in the client: cancelled; already sent ahead to the worker: dropped there, unstarted.
    assert all(f.cancelled() or isinstance(f.exception(timeout=15), BrokenWorkerPool) for f in queued)
    assert any(f.cancelled() for f in queued)
    assert time.monotonic() - started < 10
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        executor.submit(abs, 1)
    assert wait_until(lambda: not alive(worker_pid), timeout=15)


def test_terminate_workers_spares_other_clients_of_a_shared_worker(start_worker, tmp_path) -> None:
    worker = start_worker(processes=2)
    with ZMQExecutor(worker.endpoint) as other:
        theirs = other.submit(mark_then_sleep, str(tmp_path / "theirs"), 2.0)
        ours_executor = ZMQExecutor(worker.endpoint)
        ours = ours_executor.submit(mark_then_sleep, str(tmp_path / "ours"), 30)
        assert wait_until(lambda: (tmp_path / "ours").exists() and (tmp_path / "theirs").exists(), timeout=20)
        ours_executor.terminate_workers()
        assert isinstance(ours.exception(timeout=15), TaskCrashedError)
        assert theirs.exception(timeout=30) is None  # the other client's task finished normally
        ours_executor.shutdown()


def test_shutdown_without_wait_and_with_cancel_returns_at_once() -> None:
    executor = ZMQExecutor(max_workers=1)
    worker_pid = local_worker_pid(executor)
    futures = [executor.submit(sleep_then_whoami, 0.5) for _ in range(6)]
    assert wait_until(futures[0].running)
    started = time.monotonic()
    executor.shutdown(wait=False, cancel_futures=True)
    assert time.monotonic() - started < 0.1
    assert wait_until(lambda: all(f.done() for f in futures), timeout=15)
    assert sum(f.cancelled() for f in futures) >= 4
    assert wait_until(lambda: not alive(worker_pid), timeout=15)


def test_ctrl_c_during_map_cancels_the_rest_and_leaves_the_executor_usable(tmp_path) -> None:
    script = tmp_path / "ctrl_c.py"
    script.write_text(textwrap.dedent("""
        import os, signal, threading, time
        from zmqexecutor import ZMQExecutor
        with ZMQExecutor(max_workers=1) as ex:
            ex.submit(abs, 1).result(timeout=30)
            threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
            done = []
            try:
                for value in ex.map(time.sleep, [0.3] * 40):
                    done.append(value)
            except KeyboardInterrupt:
                interrupted = time.monotonic()
            print("after", ex.submit(abs, -42).result(timeout=30), flush=True)
            print("took", round(time.monotonic() - interrupted, 2), "done", len(done), flush=True)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), start_new_session=True)
    assert out.returncode == 0, out.stderr
    words = out.stdout.split()
    assert words[:2] == ["after", "42"]
    # Only what was already sent to the worker still ran. Without the caller path (portable mode), the
    # no-op's reply teaches the scheduler that tasks are tiny, so the map's first batch sends more ahead.
    assert float(words[3]) < (3.0 if _features.PORTABLE else 1.5)
    assert 1 <= int(words[5]) < 10


# --- a network partition --------------------------------------------------------------------------


def test_a_network_partition_mid_task_is_survived_and_healed(namespace, start_worker) -> None:
    name, address, link = namespace
    local = start_worker(processes=1, extra=["--insecure"])  # the client talks plain text to both
    remote_endpoint = f"tcp://{address}:{free_port()}"
    remote = WorkerProcess(remote_endpoint, processes=1, extra=["--insecure"], prefix=["ip", "netns", "exec", name])
    try:
        remote.wait_ready()
        assert "INSECURE" in remote.log()
        seen = Resolutions()
        with ZMQExecutor([remote_endpoint, local.endpoint], insecure=True, **FAST) as ex:
            assert wait_until(lambda: all(w.state == "ready" for w in ex.workers()), timeout=20)
            futures = seen.track([ex.submit(sleep_then_whoami, 2.0, i) for i in range(4)])
            assert wait_until(lambda: [w.in_flight for w in ex.workers()] == [2, 2])  # two on each worker
            link(False)
            cut_at = time.monotonic()
            try:
                assert wait_until(lambda: state_of(ex, remote_endpoint) != "ready", timeout=10)
                detected = time.monotonic() - cut_at
                results = [f.result(timeout=60) for f in futures]
            finally:
                link(True)
            assert detected < 3.0
            assert [tag for _, _, tag in results] == [0, 1, 2, 3]
            assert local.pid in {parent for parent, _, _ in results}
            # Healed: the worker across the link is used again, and its late results change nothing.
            assert wait_until(lambda: state_of(ex, remote_endpoint) == "ready", timeout=30)
            later = [f.result(timeout=30) for f in [ex.submit(sleep_then_whoami, 0.3) for _ in range(6)]]
            assert remote.pid in {parent for parent, _, _ in later}
            seen.assert_exactly_once(futures)
    finally:
        remote.stop()



def test_a_dialled_in_worker_across_a_cut_link_is_lost_then_joins_again(namespace, start_worker) -> None:
    name, address, link = namespace
    here = address.rsplit(".", 1)[0] + ".1"
    listen = f"tcp://{here}:{free_port()}"
    local = start_worker(processes=1, extra=["--insecure"])
    remote = WorkerProcess(listen, processes=1, extra=["--insecure"], prefix=["ip", "netns", "exec", name],
                           connect=True)
    try:
        seen = Resolutions()
        with ZMQExecutor(local.endpoint, listen=listen, insecure=True, **FAST) as ex:
            ex.wait_for_workers(2, timeout=20)
            futures = seen.track([ex.submit(sleep_then_whoami, 2.0, i) for i in range(4)])
            assert wait_until(lambda: [w.in_flight for w in ex.workers()] == [2, 2])
            link(False)
            try:
                # Its connection is not closed (nothing says so across a cut link): heartbeats tell.
                assert wait_until(lambda: sum(w.state == "ready" for w in ex.workers()) == 1, timeout=10)
                results = [f.result(timeout=60) for f in futures]
            finally:
                link(True)
            assert [tag for _, _, tag in results] == [0, 1, 2, 3]
            assert {parent for parent, _, _ in results} == {local.pid}  # the two lost ones ran again here
            # Healed: the same worker shakes hands again and takes tasks; late replies change nothing.
            assert wait_until(lambda: sum(w.state == "ready" for w in ex.workers()) == 2, timeout=30)
            later = [f.result(timeout=30) for f in [ex.submit(sleep_then_whoami, 0.3) for _ in range(6)]]
            assert remote.pid in {parent for parent, _, _ in later}
            seen.assert_exactly_once(futures)
    finally:
        remote.stop()

# --- Ctrl-C and clients that vanish -----------------------------------------------------------------

_CTRL_C_SCRIPT = '''
import os, sys, time
from zmqexecutor import ZMQExecutor

def mark_then_sleep(path, seconds):
    open(path, "w").close()
    time.sleep(seconds)
    open(path + ".finished", "w").close()

with ZMQExecutor(%s) as ex:
    futures = [ex.submit(mark_then_sleep, os.path.join(sys.argv[1], f"started{i}"), 20) for i in range(4)]
    [f.result() for f in futures]
'''


def _start_script(tmp_path, body: str) -> subprocess.Popen:
    script = tmp_path / "script.py"
    script.write_text(body)
    return subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))


@pytest.mark.parametrize("where", ["local", "remote"])
def test_ctrl_c_returns_promptly_and_stops_the_running_tasks(where: str, tmp_path, start_worker) -> None:
    worker = start_worker(processes=2) if where == "remote" else None
    script = _start_script(tmp_path, _CTRL_C_SCRIPT % ("2" if worker is None else repr(worker.endpoint)))
    try:
        assert wait_until(lambda: len(list(tmp_path.glob("started?"))) == 2, timeout=30)
        task_pids = children_of(worker.pid) if worker else {p for c in children_of(script.pid) for p in children_of(c)}
        assert len(task_pids) >= 2
        interrupted = time.monotonic()
        script.send_signal(signal.SIGINT)
        _, err = script.communicate(timeout=30)
    finally:
        script.kill()
    assert time.monotonic() - interrupted < 6  # not the 20 s the tasks would take
    assert "KeyboardInterrupt" in err and "stopping its running ones" in err
    assert len(list(tmp_path.glob("started?"))) == 2 and not list(tmp_path.glob("*.finished"))
    if worker is None:
        assert wait_until(lambda: not any(alive(p) for p in task_pids), timeout=15)
    else:
        assert wait_until(lambda: worker.log().count("at its client's request") == 2, timeout=15), worker.log()
        assert worker.process.poll() is None


def test_a_worker_stops_the_running_tasks_of_a_client_that_is_gone(tmp_path, start_worker) -> None:
    worker = start_worker(processes=1)
    script = _start_script(tmp_path, _CTRL_C_SCRIPT.replace("with ZMQExecutor(%s)", "with ZMQExecutor(%s, worker_timeout=1)")
                           % repr(worker.endpoint))
    try:
        assert wait_until(lambda: (tmp_path / "started0").exists(), timeout=30)
        script.kill()  # no goodbye, no Ctrl-C: the client is simply gone
    finally:
        script.wait(10)
    # Its session expires after 3 x its worker_timeout; the task it was running stops with it.
    assert wait_until(lambda: "because its client's session ended" in worker.log(), timeout=15), worker.log()
    time.sleep(1)
    assert not (tmp_path / "started0.finished").exists() and not (tmp_path / "started1").exists()


_THOUSAND_ENDPOINTS_SCRIPT = '''
import resource, sys, time
from zmqexecutor import NoWorkersError, ZMQExecutor

folder, live = sys.argv[1], sys.argv[2:]
dead = [f"ipc://{folder}/{n}" for n in range(1000 - len(live))]  # nobody listens there
started = time.monotonic()
with ZMQExecutor(dead + live, connect_timeout=2.0, worker_timeout=60) as ex:
    if live:
        print(sorted(set(ex.map(abs, range(-50, 0)))) == list(range(1, 51)))
    else:
        try:
            ex.submit(abs, -1).result(timeout=60)
        except NoWorkersError as exc:
            print(exc)
    print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], round(time.monotonic() - started))
'''


def _soft_limit_1024() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


@pytest.mark.parametrize("live", [0, 2])
def test_a_client_given_a_thousand_endpoints_works_even_under_a_1024_file_limit(live, start_worker, tmp_path) -> None:
    # libzmq's default of 1,023 sockets per context, and a soft limit of 1,024 open files, both broke
    # a client at a few hundred endpoints.
    endpoints = [start_worker(processes=1).endpoint for _ in range(live)]
    done = subprocess.run([sys.executable, "-c", _THOUSAND_ENDPOINTS_SCRIPT, str(tmp_path), *endpoints],
                          capture_output=True, text=True, timeout=120, preexec_fn=_soft_limit_1024,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr
    *said, limit_and_time = done.stdout.strip().splitlines()
    limit, seconds = map(int, limit_and_time.split())
    assert limit > 4000 and seconds < 30
    if live:
        assert said == ["True"]
    else:  # five endpoints named, the rest counted
        assert said[0].startswith("no worker became reachable within connect_timeout=2 s (endpoints: ipc://")
        assert said[0].count("ipc://") == 5 and said[0].endswith(", and 995 more)")
