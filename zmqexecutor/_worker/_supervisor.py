"""The worker supervisor: owns one bound endpoint (or dials one client) and routes tasks to its task
processes.

Runs in the worker's main process: one loop thread (others listed below).

Data flow::

    clients (DEALER, one per executor)
        |  HELLO  TASK or BATCH of TASKs  PING  TERMINATE  CANCEL  STATUS  DRAIN  BYE
        |                                 ^  WELCOME  PONG  REJECTED  STATUS_REPLY  DRAINING  JOIN
        v                                 |  RESULT EXCEPTION INIT_FAILED OUTPUT CRASHED DROPPED RETURNED
    +------------------ supervisor (one thread, never unpickles) -----|---- (a BATCH per client
    | front (_front): a ROUTER bound to the user's endpoint, or, with        per loop turn)
    |   --connect, a DEALER dialling the client's listen address (JOIN on each new connection)
    |   Router (_router): Sessions (client id -> handshake info + initializer pickle), the queue
    |     of tasks waiting for credit in a task process (first in first out), replies going back
    |     Relay (_relay): which process runs what, credit, what a process's end means for its tasks
    |   TaskProcessPool (_taskpool): the processes: start, reap, replace, signal, time limits
    | Listener (a Unix socket in a private folder, _channel)
    +---------------------------------------------------------------------------------
        |  TASK or BATCH (renumbered with the supervisor's own ids), STOP
        v                                 ^  READY, RESULT EXCEPTION INIT_FAILED OUTPUT (or a BATCH)
    task processes (a Link each, _taskprocess): unpickle, run the user's code, pickle the reply

Started with ``--direct PATH`` (the embedded worker, by its executor), the task processes connect to
the client's Unix socket at PATH instead and exchange tasks with it directly; the supervisor then only
answers the client's HELLO and PINGs, starts, reaps and replaces processes, signals them on
TERMINATE, and sends EXITED (the process's counters) when one ends.

SIGTERM (or DRAIN, from ``zmqexecutor drain``, or the end of standard input with ``--exit-with-stdin``)
makes it drain: every client hears DRAINING, queued
tasks go back to their clients (RETURNED, sent elsewhere without counting a retry), and so do tasks
that arrive later; the running ones (and those already sent ahead to a task process) finish; then,
or after ``drain_timeout`` seconds, it exits 0. A second SIGTERM, or SIGINT, stops it at once. The
embedded worker does not drain: its executor stops it only when it has nothing running there.
Clusters stop a worker by signalling every one of its processes (Slurm, systemd's control group, a
process group): a task process holds a SIGTERM the supervisor did not announce until the supervisor
drains (``_taskprocess``), and a SIGTERM echoed within SIGTERM_ECHO_SECONDS counts as the first. Tasks
the worker stops before they finish (the drain timeout, a stop at once, a SIGKILL during the drain)
are LOST with it, for their clients to retry elsewhere, never CRASHED.

Each loop turn reads both sockets until they would block (bounded), reaps dead task processes, hands
queued tasks to processes with credit, and sends each client its replies as one message: the routing
steps are the Router's; this class owns the lifecycle (sockets, signals, draining, exiting). A process
that dies gets the task it was running (and any finished ones whose replies died with it) reported
as CRASHED; the tasks it had not started yet go back to the front of the queue; a replacement starts.

Threads: the loop above, libzmq's, pyzmq's garbage collector (relayed), and, without epoll, the
Listener's ``zmqexecutor-readiness`` watcher (_readiness), which only polls the task processes'
sockets and signals a pipe. With ``--metrics-port``, prometheus_client's HTTP thread, started once the
first task processes are forked (``when_ready``), which reads only ``snapshot``, a dict the loop
replaces whole. A task process runs the user's code in its main thread, a thread that
forwards printed output, and, without prctl, ``zmqexecutor-parent-watch``, which ends it when the
supervisor is gone.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from typing import Any, Callable, Iterator, Optional

import zmq
import zmq.utils.garbage as zmq_garbage

from .._wire import _features
from .._wire import _protocol as proto
from .._wire._errors import SecurityError
from .._wire._memory import resident_bytes, watches_others
from .._wire._protocol import Kind
from .._wire._curve import DialKeys, Guard
from .._wire._security import worker_guard
from ._cpus import available_cpus
from ._front import BoundFront, DialFront, join_info
from ._keep import DEFAULT_KEEP_BYTES, KeptBuffers
from ._router import GiveUp, Router
from ._relay import DirectTasks, Relay
from ._taskpool import TaskProcessPool

logger = logging.getLogger("zmqexecutor.worker")

# How often the supervisor looks for a vanished parent and silent sessions when nothing happens.
PARENT_CHECK_INTERVAL = 0.5

# With a metrics endpoint, the loop renews the snapshot it serves at most this often (seconds): a
# scrape sees numbers at most this old (or PARENT_CHECK_INTERVAL, when the worker is idle); each
# renewal costs the loop a status report.
METRICS_INTERVAL = 0.25

# How long a draining worker waits for its running tasks by default, before it stops them.
DEFAULT_DRAIN_TIMEOUT = 30.0

# A second SIGTERM this soon after the first is the same request delivered twice, not a second one:
# Slurm signals a job step's tasks, and its srun, signalled too, passes the same SIGTERM on (7 ms later
# here). Later, a second SIGTERM stops the worker at once. Longer covers a slower echo, but a person who
# sends SIGTERM twice within it gets a drain instead of a stop.
SIGTERM_ECHO_SECONDS = 0.5




class Supervisor:
    """Owns the bound endpoint and the task processes; routes frames between them."""

    def __init__(self, bind: Optional[str], processes: int, *, parent_pid: Optional[int] = None,
                 secret_key_file: Optional[str] = None, allow: Optional[str] = None, direct: Optional[str] = None,
                 max_message_size: int = proto.DEFAULT_MAX_MESSAGE_SIZE,
                 drain_timeout: float = DEFAULT_DRAIN_TIMEOUT, connect: Optional[str] = None,
                 dial_keys: Optional[DialKeys] = None, idle_timeout: Optional[float] = None,
                 exit_with_stdin: bool = False, keep_bytes: int = DEFAULT_KEEP_BYTES,
                 memory_per_child: Optional[int] = None, memory_limit: Optional[int] = None,
                 resources: Optional[dict[str, float]] = None) -> None:
        if (bind is None) == (connect is None):
            raise ValueError("a worker either binds an endpoint or connects to a client's, not both")
        self.bind = bind
        self.connect = connect
        self.dial_keys = dial_keys
        self.idle_timeout = idle_timeout
        self.idle_since = time.monotonic()
        self.exit_with_stdin = exit_with_stdin
        self.secret_key_file = secret_key_file
        self.allow = allow
        self.max_message_size = max_message_size
        self.guard: Optional[Guard] = None
        self.processes = processes
        self.parent_pid = parent_pid
        self.instance = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.endpoint = bind or connect
        self.direct = direct
        # Relayed, the task processes connect to a socket in a folder of our own; direct, to the client's.
        self.private_dir = None if direct else tempfile.mkdtemp(prefix="zmqexecutor-worker-")
        # Only the embedded worker's processes look for work awake after a reply (IDLE_SPIN_SECONDS):
        # there the reply wakes the caller that sends the next lone task. Relayed, the spin only takes a
        # CPU that the supervisor needs (a lone round trip over TCP here took 1.2 times as long).
        spin = direct is not None and processes <= available_cpus()
        self.pool = TaskProcessPool(direct or f"{self.private_dir}/tasks", multiprocessing.get_context("spawn"),
                                    direct=direct is not None, spin=spin, memory_per_child=memory_per_child,
                                    memory_limit=memory_limit)
        self.stopping = False
        self.drain_timeout = drain_timeout
        self.drain_requested = False  # by SIGTERM or DRAIN; taken up by the loop
        self.first_sigterm: Optional[float] = None  # when the SIGTERM that began the drain came
        self.drain_deadline: Optional[float] = None  # draining since: until then
        self.orphaned = False
        self.started = time.monotonic()
        # What the metrics endpoint serves, renewed by the loop; None: no endpoint (--metrics-port).
        self.snapshot: Optional[dict[str, Any]] = None
        # Called once the worker is ready, its first processes started (threads may start then).
        self.when_ready: Optional[Callable[[], None]] = None
        self.router = Router(self.pool, DirectTasks() if direct else Relay(resources), host=self.host, status=self.status,
                             on_drain=self.asked_to_drain, kept=KeptBuffers(keep_bytes),
                             worker_info=dict(slots=processes, instance=self.instance, host=self.host,
                                              resources=resources or {},
                                              max_message_size=max_message_size,
                                              keep_bytes=0 if direct else keep_bytes))

    # The loop -------------------------------------------------------------------------------------

    def run(self) -> int:
        # The first task processes are forked before this process has any thread (libzmq's come with
        # the context below), which is safe and saves each of them the interpreter start-up and imports
        # that spawn costs. Replacements, started once threads exist, are spawned.
        if _features.FORK_EARLY:
            self.pool.start(self.processes, multiprocessing.get_context("fork"))
        self.context = zmq.Context()
        try:
            with _signals_to(self._on_signal) as signal_fd:
                self.start()
                self.serve(signal_fd)
                self.leave()
            return 0
        except GiveUp as exc:
            logger.error("%s", exc)
            return 1
        except SecurityError as exc:
            logger.error("refusing to run: %s", exc)
            return 2
        finally:
            self.close()

    def start(self) -> None:
        if self.secret_key_file is not None:
            self.guard = worker_guard(self.context, self.secret_key_file, self.allow or "")
        self.open_sockets()
        if not self.direct:
            # pyzmq lets go of a zero-copy send's memory from a thread of its own (with a ZeroMQ context
            # of its own), started on the first such send: without this, a worker's first large result
            # would wait for that start (about 10 ms here).
            zmq_garbage.gc.start()
        if self.guard is not None:
            self.guard.prove_strangers_are_rejected(self.front.endpoint)
        if not _features.FORK_EARLY:
            self.pool.start(self.processes)
        if self.guard is not None:
            security = f"CurveZMQ ({len(self.guard.allowed)} allowed client keys)"
        else:
            security = "CurveZMQ (the client's key pinned)" if self.dial_keys is not None else "none"
        if self.pool.memory_limit is not None and not watches_others():
            logger.warning("--memory-limit is not enforced: this system does not let us read the task "
                           "processes' memory (no /proc)")
        missing = [name for name, found in _features.summary().items() if not found]
        if missing:
            logger.info("this system lacks %s: the portable way is used for each", ", ".join(missing))
        logger.info("zmqexecutor worker ready: %s=%s processes=%d instance=%s pid=%d security=%s",
                    "connect" if self.connect else "endpoint", self.endpoint, self.processes, self.instance,
                    os.getpid(), security)
        if self.when_ready is not None:
            self.when_ready()

    def serve(self, signal_fd: int) -> None:
        poller = zmq.Poller()
        stdin = sys.stdin.fileno() if self.exit_with_stdin else None
        for sock in (self.front.socket, self.front.monitor, self.pool.listener, signal_fd, stdin):
            if sock is not None:
                poller.register(sock, zmq.POLLIN)
        registered: set[int] = set()
        next_check = next_snapshot = 0.0
        limits_due: Optional[float] = None
        while not self.stopping:
            self.sync_sentinels(poller, registered)
            timeout = PARENT_CHECK_INTERVAL
            for due in (limits_due, self.drain_deadline):
                if due is not None:
                    timeout = min(timeout, max(0.0, due - time.monotonic()))
            events = dict(poller.poll(int(timeout * 1000)))
            if signal_fd in events:
                os.read(signal_fd, 4096)
            if stdin is not None and stdin in events and not os.read(stdin, 4096):
                poller.unregister(stdin)  # it stays readable at its end
                stdin = None
                if not self.request_drain("standard input closed (whoever started this worker is gone)"):
                    self.stopping = True
            self.front.connection_events()
            router = self.router
            router.receive_from_processes()
            router.receive_from_clients()
            router.reap_processes([fd for fd in events if fd in self.pool.by_sentinel])
            self.drain()
            router.dispatch_tasks()
            router.send_replies()
            if self.snapshot is not None and time.monotonic() >= next_snapshot:
                next_snapshot = time.monotonic() + METRICS_INTERVAL
                self.publish_metrics()
            limits_due = self.pool.enforce_limits(time.monotonic())
            if self.drain_deadline is not None and (
                    (not self.router.busy() and self.router.clients_caught_up())
                    or time.monotonic() >= self.drain_deadline):
                self.stopping = True
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + PARENT_CHECK_INTERVAL
                self.router.expire_sessions()
                self.check_parent()
                self.check_idle()
            if not events and self.pool.listener is not None:  # a wait in vain: idle
                self.pool.listener.trim_buffers()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGTERM:
            now = time.monotonic()
            if self.request_drain("received SIGTERM"):
                self.first_sigterm = now
                return
            if self.first_sigterm is not None and now - self.first_sigterm < SIGTERM_ECHO_SECONDS:
                logger.info("received SIGTERM again %.0f ms after the first: taken as the same request",
                            (now - self.first_sigterm) * 1000)
                return
        logger.info("received %s, stopping", signal.Signals(signum).name)
        self.stopping = True

    def sync_sentinels(self, poller: zmq.Poller, registered: set[int]) -> None:
        current = set(self.pool.by_sentinel)
        for fd in registered - current:
            poller.unregister(fd)
        for fd in current - registered:
            poller.register(fd, zmq.POLLIN)
        registered.clear()
        registered.update(current)

    # Steps ----------------------------------------------------------------------------------------

    def open_sockets(self) -> None:
        if self.connect is not None:
            join = join_info(self.instance, self.processes, os.getpid())
            self.front: BoundFront | DialFront = DialFront(
                self.context, self.connect, join=join, max_message_size=self.max_message_size, keys=self.dial_keys)
        else:
            assert self.bind is not None
            try:
                self.front = BoundFront(self.context, self.bind, max_message_size=self.max_message_size,
                                        guard=self.guard)
            except zmq.ZMQError as exc:
                raise GiveUp(f"cannot bind {self.bind}: {exc}") from None
        self.endpoint = self.front.endpoint
        self.router.front = self.front
        self.pool.open()

    def status(self) -> dict[str, Any]:
        router = self.router
        return dict(proto.local_versions(), slots=self.processes, busy=self.router.busy(), queued=len(router.queue),
                    **router.tally, timed_out=self.pool.timed_out, clients=len(router.sessions),
                    uptime=time.monotonic() - self.started, draining=self.drain_requested,
                    instance=self.instance, host=self.host, pid=os.getpid(),
                    security="CurveZMQ" if self.guard is not None else "none",
                    kept_bytes=router.kept.size, keep_bytes=router.kept.budget,
                    resources=router.relay.resources, resources_in_use=router.relay.in_use,
                    memory_bytes=self.memory_bytes(),
                    **{f"kept_{name}": count for name, count in router.kept.counts.items()})

    def memory_bytes(self) -> Optional[int]:
        """The resident memory of the supervisor and its task processes together, where known."""
        sizes = [resident_bytes(proc.process.pid) for proc in self.pool.procs() if proc.process.pid is not None]
        if any(size is None for size in sizes):
            return None
        return sum(size for size in sizes if size is not None) + (resident_bytes() or 0)

    def publish_metrics(self) -> None:
        """Make a fresh ``snapshot`` for the metrics endpoint (``--metrics-port``), which reads it from
        its own thread: a copy made here, in the loop thread, is never read while it changes."""
        router = self.router
        durations = router.relay.durations
        self.snapshot = dict(self.status(), resources=dict(router.relay.resources),
                             resources_in_use=dict(router.relay.in_use), bytes_received=router.bytes_received,
                             bytes_sent=router.bytes_sent, duration_buckets=durations.cumulative(),
                             duration_sum=durations.sum)

    def request_drain(self, why: str) -> bool:
        """Begin draining (the loop does it), unless already asked or embedded; False then."""
        if self.drain_requested or self.direct is not None:
            return False
        logger.info("%s: draining (running tasks get up to %g s); a second SIGTERM stops at once",
                    why, self.drain_timeout)
        self.drain_requested = True
        self.pool.mark_draining()
        return True

    def asked_to_drain(self) -> None:
        if self.request_drain("asked to drain"):
            self.drain()

    def drain(self) -> None:
        """Once asked to drain: tell every client, and give back what waits here."""
        if not self.drain_requested:
            return
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + self.drain_timeout
            self.router.tell_draining()
            logger.info("draining: %d task(s) running; no more are taken", self.router.busy())
        # Also what a crashed task process had not started yet, put back here by reap_processes.
        self.router.give_back_queue()

    def leave(self) -> None:
        """Stopping with tasks still here: queued ones go back to their clients, and those the processes
        were given are lost with this worker (each client retries them elsewhere) rather than left to
        its heartbeat to find out."""
        if self.direct is not None:
            return  # its client accounts for its processes itself
        router = self.router
        if not router.draining:  # so that no client sends more meanwhile
            router.tell_draining()
        router.receive_from_processes()
        router.give_back_queue()
        if self.drain_deadline is not None and time.monotonic() >= self.drain_deadline:
            why = f"its worker stopped when its drain timeout of {self.drain_timeout:g} s passed"
        else:
            why = "its worker was stopped at once, before the task finished"
        router.abandon_running(why)
        router.send_replies()

    def check_idle(self) -> None:
        if self.router.sessions or self.router.busy():
            self.idle_since = time.monotonic()
        elif self.idle_timeout is not None and time.monotonic() - self.idle_since >= self.idle_timeout:
            logger.info("no client for %g s (--idle-timeout); stopping", self.idle_timeout)
            self.stopping = True

    def check_parent(self) -> None:
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            logger.info("parent process %d is gone; stopping", self.parent_pid)
            self.stopping = True
            self.orphaned = True

    def close(self) -> None:
        self.pool.stop()
        front = getattr(self, "front", None)
        if front is not None:
            front.close()
        if self.guard is not None:
            self.guard.stop()
        self.context.term()
        if self.private_dir is not None:
            shutil.rmtree(self.private_dir, ignore_errors=True)
        if self.orphaned and self.direct is not None:
            # The executor that embedded us died without cleaning up (SIGTERM, SIGKILL): its private
            # folder, which holds our sockets, is ours to remove.
            folder = os.path.dirname(self.direct)
            if os.path.basename(folder).startswith("zmqexecutor-"):
                shutil.rmtree(folder, ignore_errors=True)
        logger.info("zmqexecutor worker stopped")


@contextlib.contextmanager
def _signals_to(handler: Any) -> Iterator[int]:
    """SIGINT and SIGTERM call ``handler`` and make the yielded descriptor readable (to wake a poll);
    afterwards SIGTERM is ignored."""
    signal_r, signal_w = os.pipe()
    os.set_blocking(signal_w, False)
    old_wakeup = signal.set_wakeup_fd(signal_w)
    old_handlers = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield signal_r
    finally:
        signal.set_wakeup_fd(old_wakeup)
        # Stopping already: a late SIGTERM (srun's copy of the first, a service manager's) must not turn
        # the exit under way into a death by signal. SIGKILL still ends it.
        for sig, old in old_handlers.items():
            signal.signal(sig, signal.SIG_IGN if sig == signal.SIGTERM else old)
        os.close(signal_r)
        os.close(signal_w)
