"""What becomes of a task's future, decided without sockets: errors, a second outcome, time limits."""

from __future__ import annotations

import logging
from concurrent.futures import Future

from zmqexecutor import TaskCrashedError, TaskTimeoutError
from zmqexecutor._client._outcomes import crash_error, fail, settled
from zmqexecutor._client._scheduler import Task


def task_with(future: Future) -> Task:
    return Task(7, future, [b""], 1)


def test_a_second_outcome_is_refused_and_logged_as_an_error(caplog) -> None:
    future: Future = Future()
    future.set_running_or_notify_cancel()
    task = task_with(future)
    task.started = True
    assert not settled(task, "RESULT")
    future.set_result(1)
    with caplog.at_level(logging.ERROR, logger="zmqexecutor"):
        fail(task, RuntimeError("late"))
    assert future.result() == 1
    assert "task 7 already had its outcome; a second one (RuntimeError) was ignored" in caplog.text


def test_a_cancelled_future_takes_no_outcome_quietly(caplog) -> None:
    future: Future = Future()
    assert future.cancel()
    with caplog.at_level(logging.ERROR, logger="zmqexecutor"):
        fail(task_with(future), RuntimeError("after cancel"))
        assert settled(task_with(future), "RESULT")
    assert future.cancelled() and caplog.text == ""


def test_a_crash_reports_its_signal_and_a_time_limit_says_so() -> None:
    crash = crash_error("tcp://h:1", {"exitcode": -9, "host": "h", "pid": 42})
    assert isinstance(crash, TaskCrashedError) and crash.signal == "SIGKILL" and "killed by SIGKILL" in str(crash)
    timeout = crash_error("tcp://h:1", {"exitcode": -15, "host": "h", "pid": 42, "timed_out": 1.5})
    assert isinstance(timeout, TaskTimeoutError) and isinstance(timeout, TimeoutError)
    assert (timeout.limit, timeout.pid, timeout.endpoint) == (1.5, 42, "tcp://h:1")
    assert "time limit of 1.5 s" in str(timeout)


def test_a_time_limit_error_survives_pickling() -> None:
    import pickle

    error = TaskTimeoutError("too long", limit=2.0, host="h", pid=3, endpoint="tcp://h:1")
    again = pickle.loads(pickle.dumps(error))
    assert (str(again), again.limit, again.host, again.pid, again.endpoint) == ("too long", 2.0, "h", 3, "tcp://h:1")
