"""The embedded worker's direct path: the client exchanges tasks with its local task processes.

Data flow::

    Engine (I/O thread)                                            the local worker's task processes
      Scheduler: a Load of one slot per task process
      DirectLanes: ROUTER bound at ipc:// in the worker's private folder
          --- TASK or BATCH of TASKs (a process's first with the initializer), STOP --->  DEALER (id: pid)
          <-- READY, RESULT EXCEPTION INIT_FAILED OUTPUT (alone or in a BATCH) ---------

    local supervisor --- EXITED (pid, tasks started and finished, exit code) ---> Engine (its connection)

A relayed task crosses four hops (client, supervisor, task process and back); a direct one crosses
two, which is what lets a lone task's round trip compete with ProcessPoolExecutor's. The supervisor
keeps everything but the tasks: it starts, reaps and replaces the processes and answers heartbeats.
When a process ends, it reports the process's two counters; the lane knows in which order it sent
that process its tasks, so the first ``finished`` of them ran (their replies, if not here by now,
died with it: retried), the next was running (crashed, unless the process retired), and the rest
never started (sent again, no retry counted).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import zmq

from . import _protocol as proto
from ._protocol import Item, Kind
from ._scheduler import Load, Task
from ._sockets import unbounded


class Lane:
    """One task process as the client sees it: its load and the order its tasks were sent in."""

    __slots__ = ("lanes", "ident", "pid", "load", "given", "initialized", "stopped")

    def __init__(self, lanes: "DirectLanes", ident: bytes, endpoint: str, quota: Optional[int]) -> None:
        self.lanes = lanes
        self.ident = ident
        self.pid = int(ident)
        self.load = Load(endpoint, owner=self)
        self.load.quota = quota
        self.given = 0  # tasks sent to this process
        self.initialized = False
        self.stopped = False

    def send_tasks(self, batch: list[Task]) -> bool:
        return self.lanes.send(self, batch)


class Ending(NamedTuple):
    """What became of the tasks in flight on a task process that ended."""

    ran: list[Task]  # finished; their replies died with the process
    running: Optional[Task]
    unstarted: list[Task]


class DirectLanes:
    """The client's end of the direct path: one socket, one lane per task process."""

    def __init__(self, context: zmq.Context[Any], address: str, endpoint: str, *, client_id: bytes,
                 init_blob: bytes, max_tasks_per_child: Optional[int], sent_to: set[Any]) -> None:
        self.endpoint = endpoint
        self.client_id = client_id
        self.init_blob = init_blob
        self.max_tasks_per_child = max_tasks_per_child
        self.sent_to = sent_to
        self.lanes: dict[bytes, Lane] = {}
        self.completed = 0  # by processes that ended
        # No MAXMSGSIZE: the peers are our own processes in a folder only this user can enter, and a
        # result too large for it would be dropped with the connection, its task left waiting.
        self.socket = unbounded(context.socket(zmq.ROUTER), linger=0)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.socket.bind(address)

    def add(self, ident: bytes) -> Lane:
        lane = self.lanes[ident] = Lane(self, ident, self.endpoint, self.max_tasks_per_child)
        lane.load.slots = 1
        return lane

    def send(self, lane: Lane, batch: list[Task]) -> bool:
        items = []
        lane.given += len(batch)
        for task in batch:
            items.append(proto.process_task(task.ident, self.client_id,
                                            b"" if lane.initialized else self.init_blob, task.frames))
            lane.initialized = True
        self.sent_to.add(self)
        try:
            self.socket.send_multipart([lane.ident, *proto.encode_messages(items)], zmq.NOBLOCK, copy=False)
            if lane.load.quota == 0 and not lane.stopped:  # max_tasks_per_child: these are its last
                lane.stopped = True
                self.socket.send_multipart([lane.ident, proto.encode_header(Kind.STOP)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            # The process is gone; its EXITED accounts for what it had. It gets nothing more.
            lane.given -= len(batch)
            lane.load.quota = 0
            return False
        return True

    def end(self, lane: Lane, tasks: list[Task], started: int, finished: int) -> Ending:
        """Sort the tasks that were in flight on ``lane``'s process, which ended, by its counters.

        ``tasks`` are in the order they were sent. A process runs its tasks in that order and its
        replies arrive in that order, so those still in flight are the last ones it was sent.
        """
        del self.lanes[lane.ident]
        self.completed += lane.load.completed
        return sort_out(tasks, lane.given, started, finished)

    def in_flight(self) -> int:
        return sum(len(lane.load.inflight) for lane in list(self.lanes.values()))

    def completed_total(self) -> int:
        return self.completed + sum(lane.load.completed for lane in list(self.lanes.values()))

    def close(self) -> None:
        self.socket.close(linger=0)


def sort_out(tasks: list[Task], given: int, started: int, finished: int) -> Ending:
    """``tasks``, the last ones of the ``given`` sent to a process, by what its counters say."""
    ran, running, unstarted = [], None, []
    for seq, task in enumerate(tasks, start=given - len(tasks)):
        if seq < finished:
            ran.append(task)
        elif seq < started:
            running = task
        else:
            unstarted.append(task)
    return Ending(ran, running, unstarted)


def reply_items(frames: list[Any]) -> tuple[bytes, list[Item]]:
    """A message from a task process: who sent it, and what it holds."""
    proto.expect_frames(frames, 2)
    header = proto.decode_header(frames[1])
    return frames[0].bytes, proto.split(header, frames[1:])
