"""Which task process runs which task on a worker, and what a process's end means for its tasks:
the relay driven directly, with no sockets and no processes."""

from __future__ import annotations

import collections

from workerfakes import FakeProcess

from zmqexecutor._wire import _pacing, _protocol as proto
from zmqexecutor._wire._protocol import Kind
from zmqexecutor._worker._relay import DirectTasks, Queued, Relay
from zmqexecutor._worker._sessions import Sessions
from zmqexecutor._worker._taskpool import TaskProcess
from zmqexecutor._worker._taskprocess import COUNTERS, FINISHED, STARTED


def process(ready: bool = True) -> TaskProcess:
    proc = TaskProcess(FakeProcess(), [0] * COUNTERS)
    proc.ready = ready
    return proc


def sessions(*clients: bytes, max_tasks_per_child: int | None = None) -> Sessions:
    found = Sessions()
    for client in clients:
        found.open(client, b"init-" + client, {"max_tasks_per_child": max_tasks_per_child})
    return found


def queue(client: bytes, count: int, first: int = 1) -> "collections.deque[Queued]":
    return collections.deque(Queued(client, first + i, [b"call"]) for i in range(count))


def test_each_ready_process_gets_one_task_while_their_length_is_unknown() -> None:
    relay = Relay()
    procs = [process(), process(), process(ready=False)]
    waiting = queue(b"c", 5)
    handed = relay.hand_out(waiting, sessions(b"c"), procs, now=1.0)
    assert [(h.proc, len(h.items)) for h in handed] == [(procs[0], 1), (procs[1], 1)]
    assert len(waiting) == 3
    assert relay.hand_out(waiting, sessions(b"c"), procs, now=1.0) == []  # no credit left
    assert relay.busy(procs) == 2 and not relay.idle(procs)


def test_short_tasks_earn_tasks_ahead_shared_fairly_and_long_ones_none() -> None:
    relay = Relay()
    procs = [process(), process()]
    relay.service = 1e-4
    ahead = _pacing.TO_PROCESSES.ahead(1e-4)
    assert ahead == 20 and relay.credit(procs[0]) == 1 + ahead
    waiting = queue(b"c", 10)
    handed = relay.hand_out(waiting, sessions(b"c"), procs, now=1.0)
    assert sorted(len(h.items) for h in handed) == [5, 5] and not waiting
    relay.service = 1.0
    assert relay.credit(process()) == 1


def test_the_initializer_goes_with_each_process_first_task_of_each_client() -> None:
    relay = Relay()
    proc = process()
    relay.service = 1e-4
    handed = relay.hand_out(queue(b"a", 2) + queue(b"b", 1), sessions(b"a", b"b"), [proc], now=1.0)
    tasks = [proto.decode_process_task(item.frames) for item in handed[0].items]
    assert [(client, bytes(init)) for client, init, _ in tasks] == [(b"a", b"init-a"), (b"a", b""), (b"b", b"init-b")]
    relay.forget_client(b"a")  # a new session of "a" would have to initialize again
    handed = relay.hand_out(queue(b"a", 1, first=9), sessions(b"a"), [proc], now=2.0)
    assert bytes(proto.decode_process_task(handed[0].items[0].frames)[1]) == b"init-a"


def test_a_task_of_a_session_that_is_gone_is_dropped_not_handed_out() -> None:
    relay = Relay()
    waiting = queue(b"gone", 1) + queue(b"c", 1)
    handed = relay.hand_out(waiting, sessions(b"c"), [process()], now=1.0)
    assert [relay.assignment(handed[0].proc, item.ident).client for item in handed[0].items] == [b"c"]


def test_max_tasks_per_child_closes_the_process_and_it_retires_once_done() -> None:
    relay = Relay()
    relay.service = 1e-4
    proc = process()
    handed = relay.hand_out(queue(b"c", 5), sessions(b"c", max_tasks_per_child=2), [proc], now=1.0)
    idents = [item.ident for item in handed[0].items]
    assert len(idents) == 2 and relay.credit(proc) == 0
    relay.finished(proc, idents[0], now=1.1)
    assert not relay.may_retire(proc)
    relay.finished(proc, idents[1], now=1.2)
    assert relay.may_retire(proc)


def test_replies_teach_the_pace_and_unknown_ones_are_refused() -> None:
    relay = Relay()
    proc = process()
    [handed] = relay.hand_out(queue(b"c", 1), sessions(b"c"), [proc], now=10.0)
    assert relay.finished(proc, 999, now=10.5) is None
    assignment = relay.finished(proc, handed.items[0].ident, now=10.5)
    assert assignment is not None and (assignment.client, assignment.task_id) == (b"c", 1)
    assert relay.service == 0.5


def test_an_ended_process_crashes_its_running_task_loses_finished_ones_and_requeues_the_rest() -> None:
    relay = Relay()
    relay.service = 1e-4
    proc = process()
    relay.hand_out(queue(b"c", 4), sessions(b"c"), [proc], now=1.0)
    proc.counters[STARTED], proc.counters[FINISHED] = 2, 1  # task 1 finished (reply unsent), task 2 ran
    proc.process.exitcode = -9
    ended = relay.ended(proc, host="h", stopped_with_worker=False)
    assert [(to, item.kind, item.ident) for to, item in ended.replies] == [(b"c", Kind.LOST, 1), (b"c", Kind.CRASHED, 2)]
    assert proto.decode_json(ended.replies[1][1].frames[0])["signal"] == "SIGKILL"
    assert [q.task_id for q in ended.unstarted] == [3, 4]
    assert relay.busy([proc]) == 0  # forgotten


def test_a_process_killed_with_its_stopping_worker_loses_its_task_instead_of_crashing_it() -> None:
    relay = Relay()
    proc = process()
    relay.hand_out(queue(b"c", 1), sessions(b"c"), [proc], now=1.0)
    proc.counters[STARTED] = 1
    proc.process.exitcode = -15
    ended = relay.ended(proc, host="h", stopped_with_worker=True)
    assert [item.kind for _, item in ended.replies] == [Kind.LOST]


def test_the_running_task_is_found_by_its_client_and_id() -> None:
    relay = Relay()
    procs = [process(), process()]
    relay.hand_out(queue(b"c", 2), sessions(b"c"), procs, now=1.0)
    assert relay.running_task(procs, b"c", 2, None) is None  # handed out, not started
    procs[1].counters[STARTED] = 1
    assert relay.running_task(procs, b"c", 2, None) is procs[1]
    assert relay.runs_for(procs[1], b"c") and not relay.runs_for(procs[1], b"other")
    assert relay.abandon("bye") and relay.idle(procs)


def test_direct_processes_take_nothing_from_the_relay_and_report_their_end_to_every_client() -> None:
    direct = DirectTasks()
    proc = process()
    assert "only from the executor that embeds it" in (direct.refuses_tasks() or "")
    proc.counters[STARTED] = 3
    proc.counters[FINISHED] = 2
    assert direct.busy([proc]) == 1 and direct.runs_for(proc, b"anyone")
    pid = proc.process.pid
    assert direct.running_task([proc], b"c", pid, 2) is proc
    assert direct.running_task([proc], b"c", pid, 1) is None  # that one finished already
    proc.process.exitcode = 1
    [(to, item)] = direct.ended(proc, host="h", stopped_with_worker=False).replies
    assert to is None and item.kind == Kind.EXITED and item.ident == pid
    assert proto.decode_exited(item.frames)["started"] == 3
