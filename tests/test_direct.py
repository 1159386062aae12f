"""The embedded worker's direct path: how a client settles the tasks of a task process that ended."""

from __future__ import annotations

from concurrent.futures import Future

from zmqexecutor._client._direct import sort_out
from zmqexecutor._client._scheduler import Task


def tasks(*idents: int) -> list[Task]:
    return [Task(ident, Future(), [b"x"], 1) for ident in idents]


def idents(ts: list[Task]) -> list[int]:
    return [t.ident for t in ts]


def test_the_counters_split_what_was_in_flight_into_ran_running_and_unstarted() -> None:
    # 10 sent; replies for the first 4 arrived; it finished 6 (2 replies held), started 7, so the
    # 7th (seq 6) was running and the last 3 never started.
    ending = sort_out(tasks(14, 15, 16, 17, 18, 19), given=10, started=7, finished=6)
    assert idents(ending.ran) == [14, 15]
    assert ending.running is not None and ending.running.ident == 16
    assert idents(ending.unstarted) == [17, 18, 19]


def test_a_process_that_ended_between_tasks_was_running_none() -> None:
    ending = sort_out(tasks(1, 2, 3), given=5, started=2, finished=2)
    assert ending.ran == [] and ending.running is None and idents(ending.unstarted) == [1, 2, 3]


def test_a_process_that_ended_with_every_reply_delivered_leaves_nothing() -> None:
    ending = sort_out([], given=5, started=5, finished=5)
    assert ending == ([], None, [], [])
