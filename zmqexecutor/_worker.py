"""The worker: a supervisor that owns one bound endpoint and N task processes.

Data flow::

    clients (DEALER, one per executor)
        |  HELLO / TASK / BYE                         ^  WELCOME / RESULT / EXCEPTION / CRASHED
        v                                             |
    +---------------------------- supervisor (one thread, never unpickles) ----------------------+
    | front ROUTER (the user's endpoint)                                                          |
    |   sessions: client id -> handshake info + initializer pickle                                |
    |   queue:    tasks waiting for an idle task process, first in first out                      |
    |   idle:     task processes with nothing to do                                                |
    | back ROUTER (ipc:// in a private folder)                                                     |
    +---------------------------------------------------------------------------------------------+
        |  TASK / STOP                                ^  READY / RESULT / EXCEPTION / INIT_FAILED
        v                                             |
    task processes (DEALER each): unpickle, run the user's code, pickle the reply

The supervisor watches every task process's sentinel. A process that dies while running a task gets
that task reported to its client as CRASHED, and a replacement is started; nothing else is disturbed.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import math
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from typing import Any, Optional, Sequence

import zmq

from . import _protocol as proto
from ._errors import MessageTooLargeError, SecurityError
from ._protocol import Kind
from ._security import WorkerGuard

logger = logging.getLogger("zmqexecutor.worker")

# How often the supervisor and the task processes look for a vanished parent when nothing happens.
PARENT_CHECK_INTERVAL = 0.5

# Task processes that die before they ever report ready point at a broken installation; rather than
# respawn them forever, the supervisor gives up after this many in a row.
MAX_STARTUP_FAILURES = 5

# On shutdown, task processes get this long to exit after SIGTERM before they are killed.
STOP_GRACE = 2.0

# Most messages taken from one socket per loop, so that one busy peer cannot starve the others.
RECV_BATCH = 256

# A session is dropped when its client has been silent for this many of the client's own timeouts
# (the client sends heartbeats several times per timeout). Dropping a live client's session costs it
# a new handshake and retries, so this errs on the long side.
SESSION_TIMEOUT_FACTOR = 3
DEFAULT_CLIENT_TIMEOUT = 5.0

# A client that connects but does not finish the ZMTP/CurveZMQ handshake is dropped after this long.
HANDSHAKE_IVL_MS = 10_000

# libzmq heartbeats on the bound socket: a connection whose client stopped answering is closed, which
# frees whatever libzmq still queued for it.
HEARTBEAT_IVL_MS = 2000
HEARTBEAT_TIMEOUT_MS = 20000

_PR_SET_PDEATHSIG = 1

# Forking is only known to be safe on Linux (macOS frameworks break in forked children).
_CAN_FORK_EARLY = sys.platform.startswith("linux")


def _die_with_parent(parent_pid: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the poll loop's parent check still ends the process
    if os.getppid() != parent_pid:
        os._exit(0)


# Most text of each stream kept per task for the client; the rest still reaches the worker's own
# stdout and stderr.
OUTPUT_LIMIT = 64 * 1024

# Seconds between forwarding the new, complete lines a running task wrote. Shorter shows them to the
# client sooner, at the cost of one more message per interval for every task that keeps printing.
OUTPUT_INTERVAL = 0.5


# --- how many task processes by default -----------------------------------------------------------

CGROUP_ROOT = "/sys/fs/cgroup"


def available_cpus() -> int:
    """The CPUs this process may use: its CPU affinity, capped by any CPU quota on its cgroup.

    A container started with ``--cpus 2`` on a 64-core host should run 2 task processes, not 64: more
    would only time-slice the quota (loky's ``cpu_count`` reasons the same way).
    """
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(count, quota)) if quota is not None else count


def _cgroup_cpu_quota() -> Optional[int]:
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        _, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if controllers == "":  # cgroup v2: "QUOTA PERIOD", or "max PERIOD" for none, in cpu.max
            for folder in _ancestors(CGROUP_ROOT, path):
                fields = _read(os.path.join(folder, "cpu.max")).split()
                quotas.append(_cpus(*fields) if len(fields) == 2 else None)
        elif "cpu" in controllers.split(","):  # cgroup v1: a quota of -1 means none
            mount = os.path.join(CGROUP_ROOT, controllers)
            for folder in _ancestors(mount if os.path.isdir(mount) else os.path.join(CGROUP_ROOT, "cpu"), path):
                quotas.append(_cpus(_read(os.path.join(folder, "cpu.cfs_quota_us")),
                                    _read(os.path.join(folder, "cpu.cfs_period_us"))))
    found = [q for q in quotas if q is not None]
    return math.ceil(min(found)) if found else None


def _cpus(quota: str, period: str) -> Optional[float]:
    # Anything but two positive integers ("max", "-1", an unreadable file) is no quota.
    if quota.isdigit() and period.isdigit() and int(quota) > 0 and int(period) > 0:
        return int(quota) / int(period)
    return None


def _ancestors(mount: str, path: str) -> list[str]:
    parts = [p for p in path.split("/") if p]
    return [os.path.join(mount, *parts[:depth]) for depth in range(len(parts), -1, -1)]


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except (OSError, ValueError):
        return ""


# --- task process ---------------------------------------------------------------------------------


class _Capture:
    """Stands in for sys.stdout or sys.stderr: writes through, and keeps the current task's text."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.lock = threading.Lock()  # the task's own threads may print while its output is forwarded
        self.parts: list[str] = []
        self.size = 0  # kept for the current task so far, forwarded or not
        self.truncated = False

    def write(self, text: str) -> int:
        if self.stream is not None:
            self.stream.write(text)
        with self.lock:
            kept = text[:OUTPUT_LIMIT - self.size]
            if len(kept) < len(text):
                self.truncated = True
            if kept:
                self.parts.append(kept)
                self.size += len(kept)
        return len(text)  # all of it was written through; a short count would make callers retry

    def flush(self) -> None:
        if self.stream is not None:
            self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)

    def begin(self) -> None:
        with self.lock:
            self.parts, self.size, self.truncated = [], 0, False

    def take(self, whole_lines: bool) -> str:
        """The text not yet taken; with ``whole_lines``, a last unfinished line stays for later."""
        with self.lock:
            text = "".join(self.parts)
            end = text.rfind("\n") + 1 if whole_lines else len(text)
            self.parts = [text[end:]] if end < len(text) else []
        return text[:end]


class _TaskLoop:
    """The loop of one task process: receive a task, run it, reply; stream its output meanwhile."""

    def __init__(self, sock: zmq.Socket[Any], host: str, pid: int) -> None:
        self.sock = sock
        self.host = host
        self.pid = pid
        self.runner = _TaskRunner(host, pid)
        self.stdout, self.stderr = _Capture(sys.stdout), _Capture(sys.stderr)
        # The socket belongs to the main thread, except while a task runs: then the forwarder may send
        # that task's output on it. The lock hands it over (ZeroMQ sockets need that memory barrier).
        self.socket_lock = threading.Lock()
        self.running: Optional[int] = None
        self.forwarder: Optional[threading.Thread] = None
        # A task may fork (multiprocessing): the child must not inherit a lock the forwarder held.
        os.register_at_fork(after_in_child=self.forget_locks)

    def forget_locks(self) -> None:
        self.stdout.lock = threading.Lock()
        self.stderr.lock = threading.Lock()

    def serve(self, supervisor_pid: int) -> None:
        sys.stdout, sys.stderr = self.stdout, self.stderr
        self.socket_lock.acquire()
        while True:
            if not self.sock.poll(int(PARENT_CHECK_INTERVAL * 1000)):
                if os.getppid() != supervisor_pid:
                    return
                continue
            frames = self.sock.recv_multipart(copy=False)
            header = proto.decode_header(frames[0])
            if header.kind == Kind.STOP:
                return
            reply = self.run(header.ident, frames[1:])
            del frames
            self.send_output(header.ident, whole_lines=False)
            self.sock.send_multipart(reply, copy=False)
            del reply

    def run(self, task_id: int, frames: Sequence[Any]) -> list[Any]:
        self.stdout.begin()
        self.stderr.begin()
        if self.forwarder is None:
            self.forwarder = threading.Thread(target=self.forward_output, name="zmqexecutor-output", daemon=True)
            self.forwarder.start()
        self.running = task_id
        self.socket_lock.release()
        try:
            return self.runner.run(task_id, frames)
        finally:
            self.socket_lock.acquire()
            self.running = None

    def forward_output(self) -> None:
        while True:
            time.sleep(OUTPUT_INTERVAL)
            with self.socket_lock:
                if self.running is not None:
                    self.send_output(self.running, whole_lines=True)

    def send_output(self, task_id: int, *, whole_lines: bool) -> None:
        out, err = self.stdout.take(whole_lines), self.stderr.take(whole_lines)
        if out or err:
            self.sock.send_multipart(proto.encode_output(
                task_id, stdout=out, stderr=err, truncated=self.stdout.truncated or self.stderr.truncated,
                host=self.host, pid=self.pid))


def task_process_main(back_address: str, supervisor_pid: int) -> None:
    _die_with_parent(supervisor_pid)
    # Ctrl-C in a terminal reaches the whole process group; the supervisor decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The supervisor starts us as daemons (reaped with it); tasks may still start processes of their
    # own, as they can in ProcessPoolExecutor's workers, which multiprocessing forbids to daemons.
    multiprocessing.current_process().daemon = False
    pid = os.getpid()
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, str(pid).encode())
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(back_address)
    sock.send(proto.encode_header(Kind.READY, pid))
    # A forked task process inherits the supervisor's log handlers, which write to the real stderr;
    # without them, the tasks' own logging goes through sys.stderr and is captured with their prints.
    logging.root.handlers.clear()
    try:
        _TaskLoop(sock, socket.gethostname(), pid).serve(supervisor_pid)
    finally:
        sock.close()
        context.term()


class _TaskRunner:
    def __init__(self, host: str, pid: int) -> None:
        self.host = host
        self.pid = pid

    def run(self, task_id: int, frames: Sequence[Any]) -> list[Any]:
        init_blob = frames[1]
        if len(proto.as_buffer(init_blob)):
            try:
                initializer, initargs = proto.loads([init_blob])
                initializer(*initargs)
            except BaseException as exc:
                return self.exception(Kind.INIT_FAILED, task_id, exc)
        try:
            fn, args, kwargs = proto.decode_call(frames[2:])
            result = fn(*args, **kwargs)
        except BaseException as exc:
            return self.exception(Kind.EXCEPTION, task_id, exc)
        del fn, args, kwargs
        try:
            return [proto.encode_header(Kind.RESULT, task_id), *proto.encode_result(result)]
        except BaseException as exc:
            return self.exception(Kind.EXCEPTION, task_id, exc)

    def exception(self, kind: Kind, task_id: int, exc: BaseException) -> list[Any]:
        return [proto.encode_header(kind, task_id), *proto.encode_exception(exc, host=self.host, pid=self.pid)]


# --- supervisor -----------------------------------------------------------------------------------


class _Session:
    __slots__ = ("client", "init_blob", "max_tasks_per_child", "expiry", "last_seen", "max_message_size")

    def __init__(self, client: bytes, init_blob: bytes, info: dict[str, Any]) -> None:
        self.client = client
        self.init_blob = init_blob
        self.max_tasks_per_child: Optional[int] = info.get("max_tasks_per_child")
        self.expiry = SESSION_TIMEOUT_FACTOR * float(info.get("timeout") or DEFAULT_CLIENT_TIMEOUT)
        self.last_seen = time.monotonic()
        limit = info.get("max_message_size")
        self.max_message_size: Optional[int] = limit if isinstance(limit, int) and limit > 0 else None


class _TaskProcess:
    __slots__ = ("process", "ident", "ready", "current", "initialized", "counts", "retiring")

    def __init__(self, process: Any) -> None:
        self.process = process
        self.ident = str(process.pid).encode()
        self.ready = False
        self.current: Optional[tuple[bytes, int]] = None
        self.initialized: set[bytes] = set()
        self.counts: dict[bytes, int] = {}
        self.retiring = False


class Supervisor:
    """Owns the bound endpoint and the task processes; routes frames between them."""

    def __init__(
        self,
        bind: str,
        processes: int,
        *,
        parent_pid: Optional[int] = None,
        secret_key_file: Optional[str] = None,
        allow: Optional[str] = None,
        max_message_size: int = proto.DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self.bind = bind
        self.secret_key_file = secret_key_file
        self.allow = allow
        self.max_message_size = max_message_size
        self.guard: Optional[WorkerGuard] = None
        self.processes = processes
        self.parent_pid = parent_pid
        self.instance = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.endpoint = bind
        self.sessions: dict[bytes, _Session] = {}
        self.queue: collections.deque[tuple[bytes, int, list[Any]]] = collections.deque()
        self.idle: collections.deque[_TaskProcess] = collections.deque()
        self.by_ident: dict[bytes, _TaskProcess] = {}
        self.by_sentinel: dict[int, _TaskProcess] = {}
        self.startup_failures = 0
        self.stopping = False
        self.mp = multiprocessing.get_context("spawn")
        self.fork_context = multiprocessing.get_context("fork") if _CAN_FORK_EARLY else None
        self.private_dir = tempfile.mkdtemp(prefix="zmqexecutor-worker-")
        self.back_address = f"ipc://{self.private_dir}/tasks"
        self.versions = proto.local_versions()
        self.started = time.monotonic()
        self.tally = {"done": 0, "failed": 0, "crashed": 0}

    # The loop -------------------------------------------------------------------------------------

    def run(self) -> int:
        # The first task processes are forked before this process has any thread (libzmq's come with
        # the context below), which is safe and saves each of them the interpreter start-up and imports
        # that spawn costs. Replacements, started once threads exist, are spawned.
        if _CAN_FORK_EARLY:
            self.start_processes(self.processes, self.fork_context)
        signal_r, signal_w = os.pipe()
        os.set_blocking(signal_w, False)
        old_wakeup = signal.set_wakeup_fd(signal_w)
        old_handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        self.context = zmq.Context()
        try:
            if self.secret_key_file is not None:
                self.guard = WorkerGuard(self.context, self.secret_key_file, self.allow or "")
            self.open_sockets()
            if self.guard is not None:
                self.guard.prove_strangers_are_rejected(self.endpoint)
            if not _CAN_FORK_EARLY:
                self.start_processes(self.processes)
            logger.info(
                "zmqexecutor worker ready: endpoint=%s processes=%d instance=%s pid=%d security=%s",
                self.endpoint, self.processes, self.instance, os.getpid(),
                f"CurveZMQ ({len(self.guard.allowed)} allowed client keys)" if self.guard else "none",
            )
            poller = zmq.Poller()
            poller.register(self.front, zmq.POLLIN)
            poller.register(self.back, zmq.POLLIN)
            poller.register(signal_r, zmq.POLLIN)
            registered: set[int] = set()
            while not self.stopping:
                self.sync_sentinels(poller, registered)
                events = dict(poller.poll(self.poll_timeout()))
                if signal_r in events:
                    os.read(signal_r, 4096)
                self.receive_from_processes()
                self.receive_from_clients()
                self.reap_processes([fd for fd in events if fd in self.by_sentinel])
                self.dispatch_tasks()
                self.expire_sessions()
                self.check_parent()
            return 0
        except _GiveUp as exc:
            logger.error("%s", exc)
            return 1
        except SecurityError as exc:
            logger.error("refusing to run: %s", exc)
            return 2
        finally:
            self.close()
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            os.close(signal_r)
            os.close(signal_w)

    def _on_signal(self, signum: int, frame: Any) -> None:
        logger.info("received %s, stopping", signal.Signals(signum).name)
        self.stopping = True

    def poll_timeout(self) -> int:
        # Parent checks and session expiry need no precision; one short period serves both.
        return int(PARENT_CHECK_INTERVAL * 1000)

    def sync_sentinels(self, poller: zmq.Poller, registered: set[int]) -> None:
        current = set(self.by_sentinel)
        for fd in registered - current:
            poller.unregister(fd)
        for fd in current - registered:
            poller.register(fd, zmq.POLLIN)
        registered.clear()
        registered.update(current)

    # Steps ----------------------------------------------------------------------------------------

    def open_sockets(self) -> None:
        self.front = self.context.socket(zmq.ROUTER)
        self.back = self.context.socket(zmq.ROUTER)
        for sock in (self.front, self.back):
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.setsockopt(zmq.LINGER, 0)
        # A client that reconnects (after a cut link, say) takes its identity over from the old connection.
        self.front.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.front.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        self.front.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        self.front.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)
        # libzmq disconnects a peer that sends a bigger frame, before we ever see it.
        self.front.setsockopt(zmq.MAXMSGSIZE, self.max_message_size)
        if self.guard is not None:
            self.guard.secure(self.front)
        try:
            self.front.bind(self.bind)
        except zmq.ZMQError as exc:
            raise _GiveUp(f"cannot bind {self.bind}: {exc}") from None
        self.endpoint = self.front.getsockopt_string(zmq.LAST_ENDPOINT)
        self.back.bind(self.back_address)

    def start_processes(self, count: int, mp: Any = None) -> None:
        for _ in range(count):
            process = (mp or self.mp).Process(
                target=task_process_main,
                args=(self.back_address, os.getpid()),
                name="zmqexecutor-task",
                daemon=True,
            )
            process.start()
            proc = _TaskProcess(process)
            self.by_ident[proc.ident] = proc
            self.by_sentinel[process.sentinel] = proc

    def receive_from_clients(self) -> None:
        for _ in range(RECV_BATCH):
            try:
                frames = self.front.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            client = frames[0].bytes
            try:
                self.handle_client_message(client, frames[1:])
            except proto.ProtocolError as exc:
                logger.warning("dropped a malformed message from client %r: %s", client, exc)

    def handle_client_message(self, client: bytes, frames: list[Any]) -> None:
        proto.expect_frames(frames, 1)
        header = proto.decode_header(frames[0], any_version=True)
        if header.kind == Kind.HELLO:
            self.greet(client, header, frames)
            return
        if header.kind == Kind.STATUS:
            self.send_to_client(client, [proto.encode_header(Kind.STATUS_REPLY), proto.encode_json(self.status())])
            return
        if header.version != proto.PROTOCOL_VERSION:
            raise proto.ProtocolError(f"protocol version {header.version}, expected {proto.PROTOCOL_VERSION}")
        if header.kind not in (Kind.TASK, Kind.PING, Kind.TERMINATE, Kind.BYE):
            raise proto.ProtocolError(f"unexpected {header.kind.name} from a client")
        session = self.sessions.get(client)
        if session is None:
            if header.kind != Kind.BYE:
                reason = "this worker has no session for the client (it restarted, or the session expired)"
                self.send_to_client(client, [proto.encode_header(Kind.REJECTED, header.ident), *proto.encode_reason(reason)])
            return
        session.last_seen = time.monotonic()
        if header.kind == Kind.TASK:
            proto.expect_frames(frames, 2)
            self.queue.append((client, header.ident, frames[1:]))
        elif header.kind == Kind.PING:
            self.send_to_client(client, [proto.encode_header(Kind.PONG)])
        elif header.kind == Kind.TERMINATE:
            self.terminate_tasks_of(client, header.ident)
        else:
            self.forget_session(client, "said goodbye")

    def greet(self, client: bytes, header: proto.Header, frames: list[Any]) -> None:
        welcome: dict[str, Any] = dict(self.versions)
        welcome.update(slots=self.processes, instance=self.instance, host=self.host, pid=os.getpid(),
                       max_message_size=self.max_message_size)
        if header.version != proto.PROTOCOL_VERSION:
            theirs: dict[str, Any] = {"protocol": header.version}
            hello_info, init_blob = theirs, b""
        else:
            hello_info, init_blob = proto.decode_hello(frames)
            theirs = hello_info
        reason = proto.version_mismatch(self.versions, theirs, us="worker", them="client")
        welcome.update(accepted=reason is None, reason=reason)
        if reason is None:
            # A client shakes hands again only after giving up on its tasks here: drop the old session.
            self.forget_session(client, "started a new session")
            self.sessions[client] = _Session(client, init_blob, hello_info)
            logger.info("client %s connected (host %s, pid %s)", client.decode(errors="replace"),
                        hello_info.get("host"), hello_info.get("pid"))
        else:
            self.forget_session(client, "was refused")
            logger.warning("refused client %r: %s", client, reason)
        self.send_to_client(client, proto.encode_welcome(welcome))

    def status(self) -> dict[str, Any]:
        return dict(
            self.versions,
            slots=self.processes,
            busy=sum(proc.current is not None for proc in self.by_ident.values()),
            queued=len(self.queue),
            done=self.tally["done"],
            failed=self.tally["failed"],
            crashed=self.tally["crashed"],
            clients=len(self.sessions),
            uptime=time.monotonic() - self.started,
            instance=self.instance,
            host=self.host,
            pid=os.getpid(),
            security="CurveZMQ" if self.guard is not None else "none",
        )

    def forget_session(self, client: bytes, why: str) -> None:
        if self.sessions.pop(client, None) is None:
            return
        kept = collections.deque(item for item in self.queue if item[0] != client)
        dropped = len(self.queue) - len(kept)
        self.queue = kept
        logger.info("client %s %s; dropped its session and %d queued task(s)",
                    client.decode(errors="replace"), why, dropped)
        for proc in self.by_ident.values():
            proc.initialized.discard(client)
            proc.counts.pop(client, None)

    def expire_sessions(self) -> None:
        now = time.monotonic()
        for session in [s for s in self.sessions.values() if now - s.last_seen > s.expiry]:
            self.forget_session(session.client, f"was silent for {session.expiry:g} s")

    def terminate_tasks_of(self, client: bytes, signum: int) -> None:
        reason = proto.encode_reason("the task was dropped before it started: its client stopped the workers")
        for item in self.queue:
            if item[0] == client:
                self.send_to_client(client, [proto.encode_header(Kind.DROPPED, item[1]), *reason])
        self.queue = collections.deque(item for item in self.queue if item[0] != client)
        sig = signal.SIGKILL if signum == signal.SIGKILL else signal.SIGTERM
        for proc in list(self.by_ident.values()):
            if proc.current is not None and proc.current[0] == client and proc.process.pid is not None:
                logger.info("stopping task process %d with %s at its client's request", proc.process.pid, sig.name)
                try:
                    os.kill(proc.process.pid, sig)
                except ProcessLookupError:
                    pass

    def send_to_client(self, client: bytes, frames: list[Any]) -> None:
        try:
            self.front.send_multipart([client, *frames], copy=False)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            logger.debug("client %r is gone; dropped its message", client)

    def receive_from_processes(self) -> None:
        for _ in range(RECV_BATCH):
            try:
                frames = self.back.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            proc = self.by_ident.get(frames[0].bytes)
            if proc is None:
                continue  # a process we already reaped
            try:
                proto.expect_frames(frames, 2)
                header = proto.decode_header(frames[1])
            except proto.ProtocolError as exc:
                logger.error("dropped a malformed message from task process %s: %s", proc.process.pid, exc)
                continue
            if header.kind == Kind.READY:
                proc.ready = True
                self.startup_failures = 0
                self.idle.append(proc)
            elif header.kind in (Kind.RESULT, Kind.EXCEPTION, Kind.INIT_FAILED):
                self.finish_task(proc, header, frames[1:])
            elif header.kind == Kind.OUTPUT and proc.current is not None and proc.current[1] == header.ident:
                if proc.current[0] in self.sessions:
                    self.send_to_client(proc.current[0], frames[1:])

    def finish_task(self, proc: _TaskProcess, header: proto.Header, frames: list[Any]) -> None:
        if proc.current is None or proc.current[1] != header.ident:
            logger.error("task process %s replied for a task it was not running", proc.process.pid)
            return
        client = proc.current[0]
        proc.current = None
        self.tally["done" if header.kind == Kind.RESULT else "failed"] += 1
        session = self.sessions.get(client)
        if session is not None:
            size = sum(len(f) for f in frames[1:])
            if session.max_message_size is not None and size > session.max_message_size:
                frames = self.too_large(header.ident, size, session.max_message_size)
            self.send_to_client(client, frames)
        else:
            logger.debug("dropped the result of task %d: its client's session is gone", header.ident)
        count = proc.counts[client] = proc.counts.get(client, 0) + 1
        limit = session.max_tasks_per_child if session else None
        if header.kind == Kind.INIT_FAILED or (limit is not None and count >= limit):
            self.retire(proc)
        else:
            self.idle.append(proc)

    def too_large(self, task_id: int, size: int, limit: int) -> list[Any]:
        error = MessageTooLargeError(
            f"the task's result is {size} bytes, more than the client's max_message_size={limit}")
        return [proto.encode_header(Kind.EXCEPTION, task_id), *proto.encode_exception(error, host=self.host, pid=os.getpid())]

    def retire(self, proc: _TaskProcess) -> None:
        proc.retiring = True
        try:
            self.back.send_multipart([proc.ident, proto.encode_header(Kind.STOP)])
        except zmq.ZMQError:
            proc.process.terminate()
        self.start_processes(1)

    def reap_processes(self, sentinels: list[int]) -> None:
        for fd in sentinels:
            proc = self.by_sentinel.pop(fd)
            del self.by_ident[proc.ident]
            proc.process.join()
            code = proc.process.exitcode
            if proc.retiring:
                continue
            signal_name = _signal_name(code)
            how = f"was killed by {signal_name}" if signal_name else f"exited with code {code}"
            if proc.current is not None:
                self.tally["crashed"] += 1
                client, task_id = proc.current
                logger.warning("task process %d %s while running a task; replacing it", proc.process.pid, how)
                crash = proto.encode_crash(exitcode=code, signal_name=signal_name, host=self.host, pid=proc.process.pid)
                self.send_to_client(client, [proto.encode_header(Kind.CRASHED, task_id), *crash])
            else:
                logger.warning("idle task process %d %s; replacing it", proc.process.pid, how)
            if not proc.ready:
                self.startup_failures += 1
                if self.startup_failures >= MAX_STARTUP_FAILURES:
                    raise _GiveUp(f"{self.startup_failures} task processes in a row died before starting; giving up")
            self.start_processes(1)

    def dispatch_tasks(self) -> None:
        while self.queue and self.idle:
            proc = self.idle.popleft()
            if self.by_ident.get(proc.ident) is not proc or proc.retiring:
                continue
            client, task_id, frames = self.queue.popleft()
            session = self.sessions.get(client)
            if session is None:
                self.idle.appendleft(proc)
                continue
            init_blob = b""
            if client not in proc.initialized:
                init_blob = session.init_blob
                proc.initialized.add(client)
            message = [proc.ident, proto.encode_header(Kind.TASK, task_id), client, init_blob, *frames]
            proc.current = (client, task_id)
            try:
                self.back.send_multipart(message, copy=False)
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
                # The process died before its sentinel was seen: the reaper reports this task as crashed.
                logger.debug("task process %s unreachable", proc.process.pid)

    def check_parent(self) -> None:
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            logger.info("parent process %d is gone; stopping", self.parent_pid)
            self.stopping = True

    def close(self) -> None:
        procs = [proc.process for proc in self.by_ident.values()]
        for process in procs:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + STOP_GRACE
        for process in procs:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(1.0)
        for sock_name in ("front", "back"):
            sock = getattr(self, sock_name, None)
            if sock is not None:
                sock.close(linger=0)
        if self.guard is not None:
            self.guard.stop()
        self.context.term()
        shutil.rmtree(self.private_dir, ignore_errors=True)
        logger.info("zmqexecutor worker stopped")


class _GiveUp(Exception):
    pass


def _signal_name(exitcode: Optional[int]) -> Optional[str]:
    if exitcode is None or exitcode >= 0:
        return None
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"
