"""A caller's thread on the embedded worker's direct path: it sends its lone task and reads the reply
itself, and all the rest still works around it (timeouts, other threads, Ctrl-C, callbacks, idle
task processes that sleep)."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, children_of, local_worker_pid, wait_until

from zmqexecutor import TaskCrashedError, ZMQExecutor

pytestmark = pytest.mark.timeout(120)


def slow_identity(x: float) -> float:
    time.sleep(x)
    return x


def fail(message: str) -> None:
    raise ValueError(message)


@pytest.fixture
def ex():
    with ZMQExecutor(max_workers=2) as executor:
        executor.submit(abs, 1).result(timeout=30)  # both task processes up
        yield executor


def _script(tmp_path: Path, body: str) -> subprocess.Popen:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_lone_round_trips_return_what_each_task_returned(ex) -> None:
    for i in range(500):
        future = ex.submit(abs, -i)
        assert type(future) is cf.Future
        assert future.result(timeout=30) == i


def test_exception_of_a_lone_task_is_read_by_its_caller(ex) -> None:
    future = ex.submit(fail, "from the task")
    error = future.exception(timeout=30)
    assert isinstance(error, ValueError) and str(error) == "from the task"
    with pytest.raises(ValueError, match="from the task"):
        future.result(timeout=0)


def test_a_result_that_times_out_leaves_the_reply_to_the_io_thread(ex) -> None:
    future = ex.submit(slow_identity, 0.8)
    started = time.monotonic()
    with pytest.raises(cf.TimeoutError):
        future.result(timeout=0.2)
    assert 0.2 <= time.monotonic() - started < 0.7
    # wait() does not read replies itself: only the I/O thread can settle the future now.
    done, _ = cf.wait([future], timeout=20)
    assert done == {future} and future.result(timeout=0) == 0.8


def test_a_zero_timeout_on_a_pending_future_raises_at_once(ex) -> None:
    future = ex.submit(slow_identity, 0.5)
    started = time.monotonic()
    with pytest.raises(cf.TimeoutError):
        future.result(timeout=0)
    assert time.monotonic() - started < 0.2
    assert future.result(timeout=20) == 0.5


def test_a_future_settled_by_another_thread_wakes_its_reading_caller(ex) -> None:
    future = ex.submit(slow_identity, 30)
    assert wait_until(future.running, timeout=20)
    # With the supervisor stopped, the task process runs on and its socket stays silent: only the
    # thread that cancels the future can end the wait.
    supervisor = local_worker_pid(ex)
    os.kill(supervisor, signal.SIGSTOP)
    try:
        threading.Timer(0.3, ex.cancel, (future,), {"force": True}).start()
        started = time.monotonic()
        with pytest.raises(cf.CancelledError):
            future.result(timeout=25)
        assert time.monotonic() - started < 5  # not the task's 30 s, nor the wait's 25
    finally:
        os.kill(supervisor, signal.SIGCONT)
    assert ex.submit(abs, -7).result(timeout=30) == 7


def test_a_lone_task_that_kills_its_process_fails_its_reading_caller_at_once(ex) -> None:
    # The reader sees the process's socket close; the crash itself is settled by the I/O thread (the
    # supervisor's EXITED), which must wake the reader, whose lanes then have nothing more to say.
    started = time.monotonic()
    with pytest.raises(TaskCrashedError):
        ex.submit(os._exit, 3).result(timeout=25)
    assert time.monotonic() - started < 10
    assert ex.submit(abs, -8).result(timeout=30) == 8


def test_threads_waiting_for_lone_tasks_at_once_each_get_their_own(ex) -> None:
    wrong: list[tuple[int, int]] = []

    def caller(offset: int) -> None:
        for i in range(offset, offset + 300):
            got = ex.submit(abs, -i).result(timeout=30)
            if got != i:
                wrong.append((i, got))

    threads = [threading.Thread(target=caller, args=(k * 1000,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    assert not any(thread.is_alive() for thread in threads)
    assert wrong == []


def test_the_io_thread_reads_again_once_lone_tasks_are_over(ex) -> None:
    for i in range(50):
        assert ex.submit(abs, -i).result(timeout=30) == i
    futures = [ex.submit(abs, -i) for i in range(2000)]
    done, _ = cf.wait(futures, timeout=60)
    assert len(done) == 2000 and [f.result() for f in futures] == list(range(2000))


def test_a_callback_that_shuts_down_in_the_reading_thread_does_not_hang(tmp_path) -> None:
    process = _script(tmp_path, """
        import time
        from zmqexecutor import TaskCrashedError, ZMQExecutor

        def nap(x):
            time.sleep(0.3)
            return x

        ex = ZMQExecutor(max_workers=1)
        ex.submit(abs, 1).result(timeout=30)
        future = ex.submit(nap, 5)
        # Runs in the thread that settles the future: here, the one waiting in result().
        future.add_done_callback(lambda f: ex.shutdown(wait=True))
        print("result", future.result(timeout=30), flush=True)
        ex.shutdown()
        print("shut down", flush=True)
    """)
    try:
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert out.split() == ["result", "5", "shut", "down"]


def test_ctrl_c_during_lone_tasks_is_raised_and_the_executor_keeps_working(tmp_path) -> None:
    interrupts = 25
    process = _script(tmp_path, f"""
        import signal
        from zmqexecutor import TaskCrashedError, ZMQExecutor

        caught = i = wrong = 0
        with ZMQExecutor(max_workers=2) as ex:
            ex.submit(abs, 1).result(timeout=30)
            print("ready", flush=True)
            while caught < {interrupts}:
                try:
                    while True:
                        i += 1
                        wrong += ex.submit(abs, -i).result(timeout=30) != i
                except KeyboardInterrupt:
                    caught += 1
            after = [ex.submit(abs, -k).result(timeout=30) for k in range(300)]
        print("caught", caught, "wrong", wrong, "after", after == list(range(300)),
              "handler", signal.getsignal(signal.SIGINT) is signal.default_int_handler, "tasks", i, flush=True)
    """)
    try:
        assert process.stdout is not None and process.stdout.readline().split() == ["ready"]
        for _ in range(interrupts):
            time.sleep(0.05)  # many lone round trips between two
            process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, err
    words = out.split()
    assert words[:8] == ["caught", str(interrupts), "wrong", "0", "after", "True", "handler", "True"], out + err
    assert int(words[9]) > 10 * interrupts


def test_idle_task_processes_sleep(ex) -> None:
    for i in range(200):
        ex.submit(abs, -i).result(timeout=30)
    # Without fork (portable mode, macOS) multiprocessing's resource tracker is a child too.
    processes = {pid for pid in children_of(local_worker_pid(ex))
                 if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()}
    assert len(processes) == 2

    def cpu_seconds() -> float:
        total = 0
        for pid in processes:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / os.sysconf("SC_CLK_TCK")

    time.sleep(0.2)
    before = cpu_seconds()
    time.sleep(1.5)
    assert cpu_seconds() - before < 0.1  # they look for work awake only a moment after each reply


@pytest.mark.parametrize("where", ["local", pytest.param("remote", marks=pytest.mark.slow)])
def test_ctrl_c_while_another_thread_holds_a_futures_lock_leaves_it_free(tmp_path, start_worker, where) -> None:
    # A stdlib Condition's lock stays taken when Ctrl-C lands in its Python __enter__ or __exit__ (a
    # third of the time here, under contention); the I/O thread then hangs in set_result. Ours may not.
    endpoints = [start_worker(f"ipc://{tmp_path}/w", processes=1).endpoint] if where == "remote" else None
    process = _script(tmp_path, f"""
        import concurrent.futures as cf, os, signal, threading, time
        from zmqexecutor import ZMQExecutor

        with ZMQExecutor({endpoints!r}, max_workers=1) as ex:
            ex.submit(abs, 1).result(timeout=30)
            future = ex.submit(time.sleep, 3)
            stop = False
            caught = 0
            # The main thread asks for each Ctrl-C from inside its try (a byte down a pipe: no lock that
            # a Ctrl-C could leave taken), so that none lands outside it while it waits for the GIL.
            asked, ask = os.pipe()

            def contend():  # every call takes the future's lock
                while not stop:
                    future.running()

            def interrupt():
                while os.read(asked, 1):
                    time.sleep(0.001)
                    os.kill(os.getpid(), signal.SIGINT)

            contender = threading.Thread(target=contend, daemon=True)
            contender.start()
            threading.Thread(target=interrupt, daemon=True).start()
            while caught < 200:
                try:
                    os.write(ask, b"x")
                    while True:
                        future.done()
                except KeyboardInterrupt:
                    caught += 1
            os.close(ask)
            stop = True
            contender.join(5)  # it cannot, if this thread kept the future's lock
            # Nor can the I/O thread, when the task ends (concurrent.futures.wait takes the lock and
            # lets it go in another way than result() does, which would hide it).
            done, _ = cf.wait([future], timeout=15)
            print("caught", caught, "stuck", contender.is_alive(), "done", future in done, flush=True)
    """)
    try:
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert out.split() == ["caught", "200", "stuck", "False", "done", "True"], out
