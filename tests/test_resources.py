"""Resources: what a worker offers and what a task needs, parsed, checked and counted; then the
client's scheduler and the worker's relay driven directly (no sockets), and real workers that offer
GPUs to tasks that ask for them."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time
from concurrent.futures import Future

import pytest
from workerfakes import FakeProcess

from zmqexecutor import NoWorkersError, ResourcesUnavailableError, ZMQExecutor
from zmqexecutor._client._scheduler import Load, Scheduler, Task
from zmqexecutor._wire import _protocol as proto
from zmqexecutor._wire._protocol import Kind
from zmqexecutor._wire._resources import check_amounts, covers, describe, give_back, parse_resources, take
from zmqexecutor._worker._relay import Queued, Relay
from zmqexecutor._worker._sessions import Sessions
from zmqexecutor._worker._taskpool import TaskProcess
from zmqexecutor._worker._taskprocess import COUNTERS

# --- amounts (no sockets) -----------------------------------------------------------------------------


def test_resources_are_read_as_names_and_amounts() -> None:
    assert parse_resources("gpu=2,mem=256") == {"gpu": 2.0, "mem": 256.0}
    assert parse_resources(" gpu = 0.5 ") == {"gpu": 0.5}
    assert describe({"mem": 256.0, "gpu": 2.0}) == "gpu=2, mem=256"
    assert describe({}) == "none"


@pytest.mark.parametrize("text", ["gpu", "gpu=", "=2", "gpu=two", "gpu=0", "gpu=-1", "gpu=inf", "g pu=1"])
def test_resources_that_are_not_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_resources(text)


def test_amounts_are_checked_for_type_and_sign() -> None:
    with pytest.raises(TypeError, match="mapping"):
        check_amounts(["gpu"], "resources")
    with pytest.raises(TypeError, match="must be a number"):
        check_amounts({"gpu": "1"}, "resources")
    with pytest.raises(ValueError, match="positive"):
        check_amounts({"gpu": 0}, "resources")
    assert check_amounts({"gpu": 1}, "resources") == {"gpu": 1.0}


def test_amounts_held_and_given_back_leave_nothing_behind() -> None:
    in_use: dict[str, float] = {}
    take(in_use, {"gpu": 0.1})
    take(in_use, {"gpu": 0.2})
    assert not covers({"gpu": 1.0 - in_use["gpu"]}, {"gpu": 0.8})
    give_back(in_use, {"gpu": 0.1})
    give_back(in_use, {"gpu": 0.2})
    assert in_use == {}


def test_a_needy_task_travels_with_its_needs_and_its_call() -> None:
    frames = proto.encode_messages([proto.needy_task(7, {"gpu": 1.0}, [b"call", b"buffer"])])
    header = proto.decode_header(frames[0])
    (item,) = proto.split(header, frames)
    assert item.kind == Kind.NEEDY_TASK and item.ident == 7
    assert proto.decode_needs(item.frames) == ({"gpu": 1.0}, [b"call", b"buffer"])
    with pytest.raises(proto.ProtocolError):
        proto.decode_needs([proto.encode_json({"gpu": -1}), b"call"])


# --- the client's scheduler (no sockets) ---------------------------------------------------------------


def needy(ident: int, **needs: float) -> Task:
    return Task(ident, Future(), [b"x"], 1, needs=needs or None)


def ready(s: Scheduler, name: str, slots: int, **resources: float) -> Load:
    load = Load(name)
    s.attach(load, slots, None, resources)
    return load


def sent(batches: list[tuple[Load, list[Task]]]) -> list[tuple[str, list[int]]]:
    return [(load.name, [t.ident for t in batch]) for load, batch in batches]


def test_a_needy_task_goes_only_where_the_free_amounts_cover_it() -> None:
    s = Scheduler(max_retries=2, max_in_flight=None)
    ready(s, "cpu", slots=4)
    gpu = ready(s, "gpu", slots=4, gpu=2)
    for i in range(1, 5):
        s.add(needy(i, gpu=1))
    batches, _ = s.next_batches(0.0)
    assert sent(batches) == [("gpu", [1, 2])]  # two GPUs: two tasks, the rest wait here
    assert gpu.in_use == {"gpu": 2.0} and len(s.needy) == 2
    assert s.next_batches(0.0)[0] == []  # nothing else fits, and the turns do not spin
    s.finished(gpu, 1, 1.0)
    assert gpu.in_use == {"gpu": 1.0}
    assert sent(s.next_batches(1.0)[0]) == [("gpu", [3])]


def test_plain_tasks_go_anywhere_beside_needy_ones() -> None:
    s = Scheduler(max_retries=2, max_in_flight=None)
    ready(s, "cpu", slots=2)
    ready(s, "gpu", slots=2, gpu=1)
    s.add(needy(1, gpu=1))
    for i in range(2, 6):
        s.add(needy(i))
    went: dict[str, set[int]] = {"cpu": set(), "gpu": set()}
    for name, idents in sent(s.next_batches(0.0)[0]):
        went[name].update(idents)
    assert 1 in went["gpu"] and went["cpu"] and went["cpu"] | went["gpu"] == {1, 2, 3, 4, 5}


def test_needy_tasks_of_a_lost_worker_wait_for_another_with_the_resources() -> None:
    s = Scheduler(max_retries=2, max_in_flight=None)
    gpu = ready(s, "gpu", slots=2, gpu=1)
    s.add(needy(1, gpu=1))
    s.next_batches(0.0)
    assert s.detach(gpu, "gone") == [] and gpu.in_use == {}
    assert [t.ident for t in s.needy] == [1]
    other = ready(s, "gpu2", slots=1, gpu=1)
    assert sent(s.next_batches(1.0)[0]) == [("gpu2", [1])] and other.in_use == {"gpu": 1.0}


def test_a_need_no_ready_worker_could_ever_meet_expires_after_the_timeout() -> None:
    s = Scheduler(max_retries=2, max_in_flight=None)
    ready(s, "gpu", slots=2, gpu=1)
    waiting = needy(1, gpu=2)  # more than any worker has, not only more than is free
    coverable = needy(2, gpu=1)
    s.add(waiting)
    s.add(coverable)
    assert s.expire_unmet(waiting.queued_at + 5, 10.0) == []
    assert s.expire_unmet(waiting.queued_at + 11, 10.0) == [waiting]
    assert [t.ident for t in s.needy] == [2]
    assert s.offered() == [("gpu", {"gpu": 1.0})]


# --- the worker's relay (no sockets) ------------------------------------------------------------------


def test_a_worker_runs_needy_tasks_of_all_its_clients_within_its_amounts() -> None:
    relay = Relay({"gpu": 2.0})
    procs = [TaskProcess(FakeProcess(), [0] * COUNTERS) for _ in range(4)]
    for proc in procs:
        proc.ready = True
    clients = Sessions()
    for client in (b"a", b"b"):
        clients.open(client, b"", {})
    # Each client counts only its own tasks: together they sent three that need a GPU each.
    waiting = collections.deque([Queued(b"a", 1, [b"call"], {"gpu": 1.0}), Queued(b"b", 1, [b"call"], {"gpu": 1.0}),
                                 Queued(b"b", 2, [b"call"], {"gpu": 1.0}), Queued(b"a", 2, [b"call"])])
    handed = relay.hand_out(waiting, clients, procs, now=1.0)
    assert sum(len(h.items) for h in handed) == 3  # two needy ones and the plain one
    assert relay.in_use == {"gpu": 2.0}
    assert list(waiting) == [Queued(b"b", 2, [b"call"], {"gpu": 1.0})]  # first in line, kept
    first = next(h for h in handed if h.items[0].frames[0] == b"a")
    relay.finished(first.proc, first.items[0].ident, now=2.0)
    assert relay.in_use == {"gpu": 1.0}
    assert sum(len(h.items) for h in relay.hand_out(waiting, clients, procs, now=2.0)) == 1
    assert relay.never_meets({"gpu": 3.0}) is not None and relay.never_meets({"gpu": 1.0}) is None


# --- real workers --------------------------------------------------------------------------------------


def busy_for(seconds: float) -> tuple[int, float, float]:
    started = time.monotonic()
    time.sleep(seconds)
    return os.getppid(), started, time.monotonic()  # the worker (supervisor) it ran on


def most_at_once(spans: list[tuple[float, float]]) -> int:
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


def test_tasks_that_need_gpus_run_only_on_the_worker_that_offers_them_two_at_a_time(start_worker) -> None:
    gpu = start_worker(processes=4, extra=["--resources", "gpu=2,mem=256"])
    cpu = start_worker(processes=2)
    with ZMQExecutor([gpu.endpoint, cpu.endpoint]) as ex:
        ex.wait_for_workers(2, timeout=30)
        needing = ex.options(resources={"gpu": 1})
        assert needing.resources == {"gpu": 1.0} and needing.task_timeout is None
        futures = [needing.submit(busy_for, 0.4) for _ in range(6)]
        time.sleep(0.2)
        offered = {w.endpoint: w for w in ex.workers()}
        assert offered[gpu.endpoint].resources == {"gpu": 2.0, "mem": 256.0}
        assert offered[gpu.endpoint].resources_in_use == {"gpu": 2.0}
        assert offered[cpu.endpoint].resources == {} and offered[cpu.endpoint].resources_in_use == {}
        status = subprocess.run([sys.executable, "-m", "zmqexecutor", "status", gpu.endpoint],
                                capture_output=True, text=True, timeout=60).stdout
        assert "resources gpu 2 of 2 in use  mem 0 of 256 in use" in status, status
        results = [f.result(timeout=60) for f in futures]
        assert {worker for worker, _, _ in results} == {gpu.pid}
        assert most_at_once([(start, end) for _, start, end in results]) == 2
        # Without needs, tasks go to both; with needs a whole map goes where they are met.
        assert {w for w, _, _ in ex.map(busy_for, [0.2] * 8)} == {gpu.pid, cpu.pid}
        assert {w for w, _, _ in needing.map(busy_for, [0.05] * 6, chunksize=2)} == {gpu.pid}


def test_needs_no_worker_offers_fail_after_connect_timeout_naming_both_sides(start_worker) -> None:
    gpu = start_worker(processes=1, extra=["--resources", "gpu=1"])
    with ZMQExecutor([gpu.endpoint], connect_timeout=1.0) as ex:
        started = time.monotonic()
        with pytest.raises(ResourcesUnavailableError) as caught:
            ex.options(resources={"gpu": 2}).submit(busy_for, 0).result(timeout=30)
        assert 1.0 <= time.monotonic() - started < 10
        assert isinstance(caught.value, NoWorkersError)
        assert caught.value.needs == {"gpu": 2.0}
        assert "gpu=2" in str(caught.value) and f"{gpu.endpoint}: gpu=1" in str(caught.value)
        assert ex.options(resources={"gpu": 1}).submit(busy_for, 0).result(timeout=30)[0] == gpu.pid


def test_bad_resources_are_refused_where_they_are_given(start_worker) -> None:
    with ZMQExecutor(max_workers=1) as ex:
        with pytest.raises(ValueError, match="positive"):
            ex.options(resources={"gpu": 0})
        with pytest.raises(TypeError, match="mapping"):
            ex.options(resources="gpu=1")  # type: ignore[arg-type]
    done = subprocess.run([sys.executable, "-m", "zmqexecutor", "worker", "--bind", "tcp://127.0.0.1:*",
                           "--resources", "gpu"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "NAME=AMOUNT" in done.stderr
