"""The embedded default: a worker on this machine, started and owned by one executor, and what its
executor's engine does with it.

Runs in the client: the executor's constructor and shutdown start and stop the worker; its I/O thread
runs ``Embedded``.

Data flow::

    Engine (I/O thread)
      Embedded ---- owns ----> LocalWorker: the ``zmqexecutor worker`` process (revived if it dies)
        |  its task processes, reached directly (DirectLanes, _direct):
        +---- TASK or BATCH, STOP -->   <-- READY, RESULT EXCEPTION INIT_FAILED OUTPUT ---> Outcomes.reply
        |  its supervisor, over the engine's connection to it:
        +<--- EXITED (a task process ended: its tasks sorted out) -------------------> Outcomes.process_ended
        +---- CANCEL (pid, which of the tasks sent to it) -------------------------->
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any, Optional

from .._wire import _protocol as proto
from ._direct import KEEP_BYTES, DirectLanes
from ._scheduler import Load

if TYPE_CHECKING:
    from ._caller import CallerPath
    from ._connection import Connection
    from ._fleet import Fleet
    from ._outcomes import Outcomes
    from ._scheduler import Scheduler
    from ._settings import Settings

logger = logging.getLogger("zmqexecutor")

# After SIGTERM the local worker stops its task processes (which takes up to its own grace period);
# past this it is killed.
STOP_TIMEOUT = 5.0

# A local worker that dies is started again, its tasks retried like those of any lost worker; but one
# that died this many times within the window is being killed on purpose or cannot run here, and
# restarting it forever would hide that: the executor breaks instead.
LOCAL_RESTARTS = 3
LOCAL_RESTART_WINDOW = 60.0

# While the engine owns a local worker it looks at it at least this often.
LOCAL_CHECK_INTERVAL = 1.0


class LocalWorker:
    """A ``zmqexecutor worker`` subprocess bound to ``ipc://`` in a folder only this user can enter."""

    def __init__(self, processes: int, *, max_memory_per_child: Optional[int] = None,
                 memory_limit: Optional[int] = None, cache_size: int = KEEP_BYTES) -> None:
        # Kept by the executor, not the worker process: the task processes map the client's memfds.
        self.cache_size = cache_size
        self.private_dir = tempfile.mkdtemp(prefix="zmqexecutor-")  # mode 0700
        self.endpoint = f"ipc://{self.private_dir}/worker"
        # Its task processes exchange tasks with the executor here, without the supervisor's relay.
        self.direct_address = f"{self.private_dir}/direct"
        env = dict(os.environ)
        # Like multiprocessing's spawn: the task processes see the same import path as this process,
        # so functions from the user's own modules unpickle there.
        env["PYTHONPATH"] = os.pathsep.join(p or os.getcwd() for p in sys.path)
        level = "DEBUG" if logger.isEnabledFor(logging.DEBUG) else "WARNING"
        self.command = [
            sys.executable, "-m", "zmqexecutor", "worker",
            "--bind", self.endpoint,
            "--processes", str(processes),
            "--parent-pid", str(os.getpid()),
            "--direct", self.direct_address,
            "--log-level", level,
        ]
        if max_memory_per_child is not None:
            self.command += ["--max-memory-per-child", str(max_memory_per_child)]
        if memory_limit is not None:
            self.command += ["--memory-limit", str(memory_limit)]
        self.env = env
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.restarts: list[float] = []
        try:
            self.start()
        except BaseException:
            shutil.rmtree(self.private_dir, ignore_errors=True)
            raise

    def start(self) -> None:
        """Start the worker process, again after it died: on the same endpoint, which it binds anew."""
        # A session of its own: Ctrl-C in the user's terminal must not kill the worker under a running
        # executor; the executor stops it, and it stops itself if we die.
        self.process = subprocess.Popen(self.command, env=self.env, stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.process.pid

    def exit_code(self) -> Optional[int]:
        return None if self.process is None else self.process.poll()

    def revive(self, *, never_ready: bool, stopping: bool) -> Optional[str]:
        """If the worker died, start it again; returns why the executor must break instead, or None."""
        code = self.exit_code()
        if code is None:
            return None
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < LOCAL_RESTART_WINDOW]
        # One that never answered is not going to: its start-up fails, and its log on stderr says why.
        if stopping or never_ready or len(self.restarts) >= LOCAL_RESTARTS:
            often = f" ({len(self.restarts) + 1} times in {LOCAL_RESTART_WINDOW:g} s)" if self.restarts else ""
            return (f"the executor's local worker process (pid {self.pid}) exited unexpectedly with code "
                    f"{code}{often}; the executor is not usable anymore")
        logger.warning("the local worker process (pid %d) exited unexpectedly with code %s; starting it again",
                       self.pid, code)
        self.restarts.append(now)
        try:
            self.start()
        except OSError as exc:
            return (f"the executor's local worker process exited with code {code} and could not be started "
                    f"again: {exc}; the executor is not usable anymore")
        return None

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    logger.warning("local worker %d did not stop in %.0f s; killing it", process.pid, STOP_TIMEOUT)
                    process.kill()
                    process.wait()
        shutil.rmtree(self.private_dir, ignore_errors=True)


class Embedded:
    """The engine's side of the worker it embeds: the worker process, and the lanes to its task
    processes, which take their tasks from the engine itself; what their replies and ends do. To the
    engine it is one more source of replies (``take_input``), like a connection."""

    def __init__(self, worker: LocalWorker, scheduler: "Scheduler", outcomes: "Outcomes") -> None:
        self.worker = worker
        self.scheduler = scheduler
        self.outcomes = outcomes
        self.lanes: Optional[DirectLanes] = None  # made in the I/O thread, by open

    def open(self, fleet: "Fleet", settings: "Settings") -> None:
        """Before the fleet connects: so that the connection to the worker carries the lanes."""
        self.lanes = DirectLanes(self.worker.direct_address, self.worker.endpoint, client_id=fleet.client_id,
                                 init_blob=settings.init_blob, max_tasks_per_child=settings.max_tasks_per_child,
                                 keep_bytes=self.worker.cache_size)
        fleet.reach_directly(self.worker.endpoint, self.lanes, self)

    def start_caller_path(self, caller: "CallerPath", io_selector: Any) -> None:
        assert self.lanes is not None
        caller.start(self.lanes, io_selector, self.receive)

    def check_interval(self, heartbeat: float) -> float:
        return min(heartbeat, LOCAL_CHECK_INTERVAL)

    def take_input(self, inbox: Any) -> bool:
        self.receive()
        return False  # level-triggered: its descriptor stays readable while anything is left unread

    def receive(self) -> None:
        assert self.lanes is not None
        for peer, frames in self.lanes.messages():
            self.handle(peer, frames)

    def handle(self, peer: Any, frames: list[Any]) -> None:
        assert self.lanes is not None
        now = time.monotonic()
        try:
            for load, (kind, ident, rest) in self.lanes.receive(peer, frames, self.scheduler,
                                                                self.lanes.supervisor.ready):
                if not self.outcomes.reply(load, kind, ident, rest, now):
                    raise proto.ProtocolError(f"unexpected {kind.name} from a task process")
        except proto.ProtocolError as exc:
            logger.warning("dropped a malformed message from a local task process: %s", exc)

    def process_exited(self, conn: "Connection", info: dict[str, Any], *, stopping: bool) -> None:
        """A task process ended (its supervisor said EXITED): settle what it had been sent."""
        assert self.lanes is not None
        if conn is not self.lanes.supervisor:
            raise proto.ProtocolError("EXITED from a worker that is not embedded")
        for peer, frames in self.lanes.last_words(info["pid"]):
            self.handle(peer, frames)
        ending = self.lanes.exited(info, self.scheduler, retry=not stopping)
        if ending is not None:
            self.outcomes.process_ended(ending, info, conn.address, stopping=stopping)

    def revive(self, connections: list["Connection"], stopping: bool) -> Optional[str]:
        """Start the worker again if it died; returns why the executor must break instead, or None."""
        never_ready = all(conn.instance is None for conn in connections)
        return self.worker.revive(never_ready=never_ready, stopping=stopping)

    def loads(self) -> list[Load]:
        return [] if self.lanes is None else [lane.load for lane in self.lanes.lanes.values()]

    def close(self) -> None:
        self.worker.stop()
        # After the worker: its task processes, which end when this closes, are not replaced.
        if self.lanes is not None:
            self.lanes.close()


class NoLocalWorker:
    """The engine's local side when every worker is remote: the same calls as ``Embedded``, doing nothing."""

    def open(self, fleet: "Fleet", settings: "Settings") -> None:
        pass

    def start_caller_path(self, caller: "CallerPath", io_selector: Any) -> None:
        pass  # the caller path stays closed: the I/O thread sends and reads every task

    def check_interval(self, heartbeat: float) -> float:
        return heartbeat

    def process_exited(self, conn: "Connection", info: dict[str, Any], *, stopping: bool) -> None:
        raise proto.ProtocolError("EXITED from a worker that is not embedded")

    def revive(self, connections: list["Connection"], stopping: bool) -> Optional[str]:
        return None

    def loads(self) -> list[Load]:
        return []

    def close(self) -> None:
        pass
