"""The embedded worker's direct path: the client exchanges tasks with its local task processes.

Runs in the client's I/O thread, or a user thread that holds the engine's lock (_caller).

Data flow::

    Engine (I/O thread)                                            the local worker's task processes
      Scheduler: a Load of one slot per task process
      DirectLanes: a Listener (_channel) in the executor's private folder; a Peer per process
          --- TASK or BATCH of TASKs (a process's first with the initializer), STOP --->  Link
          --- LONE_TASK (sent from the caller's thread, _caller) ------------------->
          <-- READY (pid), RESULT EXCEPTION INIT_FAILED OUTPUT (alone or in a BATCH) ---

    local supervisor --- EXITED (pid, tasks started and finished, exit code) ---> Engine (its connection)

A relayed task crosses four hops (client, supervisor, task process and back); a direct one crosses
two, over a plain Unix socket that wakes only the threads waiting at either end, which is what lets a
lone task's round trip beat ProcessPoolExecutor's. The supervisor
keeps everything but the tasks: it starts, reaps and replaces the processes and answers heartbeats.
When a process ends, it reports the process's two counters; the lane knows in which order it sent
that process its tasks, so the first ``finished`` of them ran (their replies, if not here by now,
died with it: retried), the next was running (crashed, unless the process retired), and the rest
never started (sent again, no retry counted).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

from .._wire import _protocol as proto
from .._wire._channel import Listener, Peer
from .._wire._protocol import Item, Kind
from .._wire._shm import MemfdStore
from ._scheduler import Load, Scheduler, Task


# What the embedded worker keeps in memfds for its task processes to map, unless the executor's
# cache_size says otherwise: as a worker's --cache-size.
KEEP_BYTES = 1 << 30


class Lane:
    """One task process as the client sees it: its load and the order its tasks were sent in."""

    __slots__ = ("lanes", "peer", "ident", "pid", "load", "given", "initialized", "stopped", "sent")

    def __init__(self, lanes: "DirectLanes", peer: Peer, pid: int, endpoint: str, quota: Optional[int]) -> None:
        self.lanes = lanes
        self.peer = peer
        self.ident = str(pid).encode()
        self.pid = pid
        self.load = Load(endpoint, owner=self)
        self.load.quota = quota
        self.given = 0  # tasks sent to this process
        self.initialized = False
        self.stopped = False
        # Digests of the function buffers sent to this process: a later task of the same function
        # goes without them, and the process uses the function it decoded (MISSING if it let it go).
        self.sent: set[bytes] = set()

    def forget_held(self) -> None:
        """The process no longer has a function it was sent (MISSING): send each again, whole."""
        self.sent.clear()

    def send_tasks(self, batch: list[Task]) -> bool:
        return self.lanes.send(self, batch)

    def cancel(self, task: Task, position: int) -> None:
        """Have the supervisor stop the task at ``position`` among those in flight here: the lane knows
        the order it sent them in, the supervisor what the process started."""
        supervisor = self.lanes.supervisor
        if supervisor is not None and supervisor.ready:
            supervisor.send(proto.encode_cancel(self.pid, self.given - len(self.load.inflight) + position))


class Ending(NamedTuple):
    """What became of the tasks in flight on a task process that ended."""

    ran: list[Task]  # finished; their replies died with the process
    running: Optional[Task]
    unstarted: list[Task]
    failed: list[tuple[Task, str]] = []  # of ``ran``, those lost too often to be retried


class DirectLanes:
    """The client's end of the direct path: one socket, one lane per task process."""

    def __init__(self, path: str, endpoint: str, *, client_id: bytes, init_blob: bytes,
                 max_tasks_per_child: Optional[int], keep_bytes: int = KEEP_BYTES) -> None:
        self.endpoint = endpoint
        self.client_id = client_id
        self.init_blob = init_blob
        self.max_tasks_per_child = max_tasks_per_child
        self.lanes: dict[bytes, Lane] = {}
        # The connection to the worker whose processes these are (set by it): it says when they end,
        # and stops one on request.
        self.supervisor: Any = None
        self.completed = 0  # by processes that ended
        self.lone_next = False  # the next batch of one goes as a LONE_TASK (set by _caller)
        # No size limit: the peers are our own processes in a folder only this user can enter, and a
        # result too large for one would be dropped with the connection, its task left waiting.
        self.listener = Listener(path)
        # The buffers that tasks carry again and again, in memfds the processes map (one copy here).
        self.kept = MemfdStore(keep_bytes)

    def fileno(self) -> int:
        return self.listener.fileno()

    def messages(self) -> list[tuple[Peer, list[Any]]]:
        return self.listener.receive()

    def receive(self, peer: Peer, frames: list[Any], scheduler: Scheduler, usable: bool) -> list[tuple[Load, Item]]:
        """A message from a task process: a new one (READY) gets a lane, attached when ``usable``;
        the replies in it are returned with the load they belong to."""
        proto.expect_frames(frames, 1)
        header = proto.decode_header(frames[0])
        if header.kind == Kind.READY:
            if peer.owner is None:
                lane = peer.owner = Lane(self, peer, header.ident, self.endpoint, self.max_tasks_per_child)
                self.lanes[lane.ident] = lane
                if usable:
                    scheduler.attach(lane.load, 1, None)
            return []
        lane = peer.owner
        if lane is None or self.lanes.get(lane.ident) is not lane:
            return []  # from a process that ended: its tasks were settled without it
        return [(lane.load, item) for item in proto.split(header, frames)]

    def last_words(self, pid: int) -> list[tuple[Peer, list[Any]]]:
        """All that task process ``pid``, which has ended, sent before it ended."""
        lane = self.lanes.get(str(pid).encode())
        if lane is None:
            return []
        return [(lane.peer, frames) for frames in self.listener.read_to_end(lane.peer)]

    def attach_all(self, scheduler: Scheduler) -> None:
        for lane in self.lanes.values():
            scheduler.attach(lane.load, 1, None)

    def detach_all(self, scheduler: Scheduler, why: str, *, retry: bool) -> list[tuple[Task, str]]:
        """The local worker is gone, its task processes with it: their tasks are retried."""
        failed = [lost for lane in self.lanes.values() for lost in scheduler.detach(lane.load, why, retry=retry)]
        self.lanes.clear()
        return failed

    def exited(self, info: dict[str, Any], scheduler: Scheduler, *, retry: bool) -> Optional[Ending]:
        """A task process ended: its lane goes. With ``retry``, what ran is retried and what never
        started goes back first in line; the engine fails the running task, those out of retries
        and, without ``retry``, the unstarted ones."""
        lane = self.lanes.pop(str(info["pid"]).encode(), None)
        if lane is None:
            return None
        self.completed += lane.load.completed
        tasks = scheduler.take_inflight(lane.load)
        scheduler.detach(lane.load, "it ended")
        ending = sort_out(tasks, lane.given, info["started"], info["finished"])
        if retry:
            scheduler.requeue(ending.unstarted)
        return ending._replace(failed=scheduler.retry(lane.load, ending.ran, retry=retry))

    def send(self, lane: Lane, batch: list[Task]) -> bool:
        items = []
        lane.given += len(batch)
        lone = self.lone_next and len(batch) == 1
        sent = set(lane.sent)
        for task in batch:
            frames = task.frames
            if task.keepable:
                digests = [digest for index, digest in task.keepable if index >= task.function_at]
                if digests and sent.issuperset(digests):  # its function's buffers went before: named alone
                    frames = frames[:task.function_at]
                sent.update(digests)
                frames = self.mapped(frames, task.keepable)
            items.append(proto.process_task(task.ident, self.client_id,
                                            b"" if lane.initialized else self.init_blob, frames, lone=lone))
            lane.initialized = True
        if not lane.peer.send(proto.encode_messages(items)):
            # The process is gone; its EXITED accounts for what it had. It gets nothing more.
            lane.given -= len(batch)
            lane.load.quota = 0
            return False
        lane.sent = sent
        if lane.load.quota == 0 and not lane.stopped:  # max_tasks_per_child: these are its last
            lane.stopped = True
            lane.peer.send(proto.encode_bare(Kind.STOP))
        return True

    def mapped(self, frames: list[Any], keepable: tuple[tuple[int, bytes], ...]) -> list[Any]:
        """``frames`` with each kept buffer (big enough) replaced by the MAPPED marker of its memfd."""
        marked = frames
        for index, digest in keepable:
            if index < len(frames):
                marker = self.kept.marker_for(digest, frames[index])
                if marker is not None:
                    marked = list(frames) if marked is frames else marked
                    marked[index] = marker
        return marked

    def in_flight(self) -> int:
        return sum(len(lane.load.inflight) for lane in list(self.lanes.values()))

    def completed_total(self) -> int:
        return self.completed + sum(lane.load.completed for lane in list(self.lanes.values()))

    def close(self) -> None:
        self.listener.close()
        self.kept.close()


def sort_out(tasks: list[Task], given: int, started: int, finished: int) -> Ending:
    """``tasks``, the last ones of the ``given`` sent to a process, by what its counters say.

    A process runs its tasks in the order they were sent and its replies arrive in that order, so the
    tasks still in flight are the last ones it was sent, in order.
    """
    ran, running, unstarted = [], None, []
    for seq, task in enumerate(tasks, start=given - len(tasks)):
        if seq < finished:
            ran.append(task)
        elif seq < started:
            running = task
        else:
            unstarted.append(task)
    return Ending(ran, running, unstarted)

