"""The worker's routing between clients and task processes, driven directly: sessions, the queue, replies
batched per client, crashes and drains. No sockets (a front that records what it would send) and no
processes (ones that only record being started)."""

from __future__ import annotations

import signal
from typing import Any

from workerfakes import FakeContext, RecordingFront

from zmqexecutor._wire import _protocol as proto
from zmqexecutor._wire import _serialize as serialize
from zmqexecutor._wire._protocol import Item, Kind
from zmqexecutor._worker._relay import DirectTasks, Relay
from zmqexecutor._worker._router import Router
from zmqexecutor._worker._taskpool import TaskProcessPool
from zmqexecutor._worker._taskprocess import STARTED

CLIENT = b"client-1"


def router(processes: int = 2, *, direct: bool = False) -> tuple[Router, RecordingFront]:
    pool = TaskProcessPool("unused", FakeContext, direct=direct)
    pool.start(processes)
    for proc in pool.procs():
        proc.ready = True
    r = Router(pool, DirectTasks() if direct else Relay(), host="h", status=lambda: {"busy": 0},
               on_drain=lambda: None, worker_info=dict(slots=processes, instance="i", host="h"))
    front = RecordingFront()
    r.front = front  # type: ignore[assignment]
    return r, front


def greet(r: Router, front: RecordingFront, client: bytes = CLIENT, **info: Any) -> None:
    r.handle_client_message(client, proto.encode_hello(dict(proto.local_versions(), **info), b"init"))
    [welcome] = front.items(client)
    assert welcome.kind == Kind.WELCOME and proto.decode_json(welcome.frames[0])["accepted"]


def replies(front: RecordingFront) -> list[Item]:
    """What the client was sent, but PACE, which any reply may carry along (tested on its own)."""
    return [item for item in front.items(CLIENT) if item.kind != Kind.PACE]


def send_tasks(r: Router, *idents: int, client: bytes = CLIENT) -> None:
    items = [Item(Kind.TASK, ident, [b"call"]) for ident in idents]
    r.handle_client_message(client, proto.encode_messages(items))


def test_tasks_of_a_session_are_queued_handed_out_and_their_replies_go_back_together() -> None:
    r, front = router(processes=2)
    greet(r, front)
    send_tasks(r, 11, 12, 13)
    assert len(r.queue) == 3
    r.dispatch_tasks()  # one each while their length is unknown
    assert len(r.queue) == 1 and r.busy() == 2
    for proc in r.pool.procs():
        [ident] = r.relay.of(proc).assigned
        r.finish_task(proc, Item(Kind.RESULT, ident, [b"result"]), now=1.0)
    assert front.sent == []  # replies wait for the end of the loop turn
    r.send_replies()
    assert len(front.sent) == 1  # both in one message
    assert sorted((i.kind, i.ident) for i in replies(front)) == [(Kind.RESULT, 11), (Kind.RESULT, 12)]
    assert r.tally["done"] == 2


def test_a_client_hears_how_long_tasks_take_with_its_replies_and_again_only_when_that_moves() -> None:
    r, front = router(processes=1)
    greet(r, front)
    [proc] = r.pool.procs()
    told = []
    for ident, started, seconds in [(1, 10.0, 0.010), (2, 20.0, 0.011), (3, 30.0, 0.050), (4, 40.0, 0.020)]:
        send_tasks(r, ident)
        r.dispatch_tasks()
        r.relay.of(proc).last_event = started  # the process began this task then
        r.finish_task(proc, Item(Kind.RESULT, ident, [b"result"]), now=started + seconds)
        r.send_replies()
        items = front.items(CLIENT)
        assert [i.kind for i in items if i.kind != Kind.PACE] == [Kind.RESULT]
        told.append([i.ident for i in items if i.kind == Kind.PACE])
        front.sent.clear()
    # In microseconds: the first measure; 10.1 ms (smoothed) is within PACE_CHANGE of it, 14.1 ms is not, 14.7 ms is within again.
    assert told == [[10_000], [], [14_090], []]
    assert round(r.relay.service * 1e6) == 14_681


def test_a_client_without_a_session_is_rejected_and_a_goodbye_without_one_is_ignored() -> None:
    r, front = router()
    send_tasks(r, 5)
    [rejected] = front.items(CLIENT)
    assert rejected.kind == Kind.REJECTED and "no session" in proto.decode_json(rejected.frames[0])["reason"]
    r.handle_client_message(CLIENT, [proto.encode_header(Kind.BYE)])
    assert front.sent == [] and not r.queue


def test_a_crashed_process_crashes_its_task_requeues_the_rest_and_is_replaced() -> None:
    r, front = router(processes=1)
    r.relay.service = 1e-4  # short tasks: several go ahead
    greet(r, front)
    send_tasks(r, 1, 2, 3)
    r.dispatch_tasks()
    [proc] = r.pool.procs()
    assert len(r.relay.of(proc).assigned) == 3
    proc.counters[STARTED] = 1
    proc.process.exitcode = -signal.SIGKILL
    r.reap_processes([proc.process.sentinel])
    r.send_replies()
    [crashed] = replies(front)
    assert (crashed.kind, crashed.ident) == (Kind.CRASHED, 1) and r.tally["crashed"] == 1
    assert [q.task_id for q in r.queue] == [2, 3]  # first in line again
    assert len(r.pool.procs()) == 1 and r.pool.procs()[0] is not proc


def test_a_result_over_the_clients_limit_becomes_an_error() -> None:
    r, front = router(processes=1)
    greet(r, front, max_message_size=10)
    send_tasks(r, 1)
    r.dispatch_tasks()
    [proc] = r.pool.procs()
    [ident] = r.relay.of(proc).assigned
    r.finish_task(proc, Item(Kind.RESULT, ident, [b"x" * 100]), now=1.0)
    r.send_replies()
    [reply] = replies(front)
    assert reply.kind == Kind.EXCEPTION
    assert b"max_message_size=10" in b"".join(bytes(f) for f in reply.frames)


def test_cancelling_a_queued_task_drops_it_and_a_goodbye_drops_the_rest() -> None:
    r, front = router(processes=1)
    greet(r, front)
    send_tasks(r, 1, 2, 3)
    r.handle_client_message(CLIENT, [proto.encode_header(Kind.CANCEL, 3)])
    r.send_replies()
    assert [(i.kind, i.ident) for i in front.items(CLIENT)] == [(Kind.DROPPED, 3)]
    r.handle_client_message(CLIENT, [proto.encode_header(Kind.BYE)])
    assert not r.queue and not r.sessions


def test_draining_gives_queued_tasks_back_and_returns_new_ones() -> None:
    r, front = router(processes=1)
    greet(r, front)
    send_tasks(r, 1, 2)
    r.draining = True
    r.give_back_queue()
    send_tasks(r, 3)
    r.send_replies()
    assert [(i.kind, i.ident) for i in front.items(CLIENT)] == [(Kind.RETURNED, 1), (Kind.RETURNED, 2),
                                                                 (Kind.RETURNED, 3)]


def test_the_embedded_worker_refuses_relayed_tasks_and_reports_each_process_end_to_its_client() -> None:
    r, front = router(processes=1, direct=True)
    greet(r, front)
    send_tasks(r, 1)
    [proc] = r.pool.procs()
    proc.counters[STARTED] = 1
    proc.process.exitcode = 1
    r.reap_processes([proc.process.sentinel])
    r.send_replies()
    dropped, exited = front.items(CLIENT)
    assert dropped.kind == Kind.DROPPED and not r.queue
    assert exited.kind == Kind.EXITED and proto.decode_exited(exited.frames)["started"] == 1


def test_a_task_naming_a_buffer_the_worker_did_not_keep_is_answered_missing() -> None:
    r, front = router(processes=1)
    greet(r, front)
    big = b"x" * 100_000
    digest = serialize.digest((big,))
    r.handle_client_message(CLIENT, proto.encode_messages([
        Item(Kind.TASK, 1, [b"\x80call", proto.keep_marker(digest), big]),
        Item(Kind.TASK, 2, [b"\x80call", proto.held_marker(digest)]),
        Item(Kind.TASK, 3, [b"\x80call", proto.held_marker(b"e" * 32)])]))
    assert [[bytes(f) for f in q.frames] for q in r.queue] == [[b"\x80call", big]] * 2
    r.send_replies()
    assert [(i.kind, i.ident) for i in front.items(CLIENT)] == [(Kind.MISSING, 3)]


def test_a_process_that_could_not_map_a_kept_buffer_has_its_task_answered_missing() -> None:
    r, front = router(processes=1)
    greet(r, front)
    send_tasks(r, 5)
    r.dispatch_tasks()
    [proc] = r.pool.procs()
    [ident] = r.relay.of(proc).assigned
    r.finish_task(proc, Item(Kind.MISSING, ident, []), now=1.0)
    r.send_replies()
    assert [(i.kind, i.ident) for i in replies(front)] == [(Kind.MISSING, 5)]  # the client sends it again
    assert r.busy() == 0 and r.tally == {"done": 0, "failed": 0, "crashed": 0, "cancelled": 0}
