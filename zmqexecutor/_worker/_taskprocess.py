"""The task process: the only place user code runs on a worker.

Runs in each task process: its main thread runs the tasks; a second forwards what they print.

Data flow::

    supervisor's Listener --- TASK (alone or in a BATCH), STOP ---> Link --> local queue
    (or the client's, for     LONE_TASK (client only: look awake                | run in order
    the embedded worker)      for the next one after replying)
                          <-- READY RESULT EXCEPTION INIT_FAILED -- replies held while more tasks
                              OUTPUT (alone or in a BATCH)          wait here (bounded), then sent

The link is a Unix stream socket (``_channel``), not ZeroMQ: both ends are this user's processes on
this host, and a plain socket wakes only the thread that waits for the message.

Two counters in memory shared with the supervisor say how many tasks this process has started and
finished, so that when it dies the supervisor (or, for the embedded worker, the client it reports
to) knows exactly which task killed it, which finished tasks lost their replies with it, and which
queued behind never started (those are sent elsewhere).
"""

from __future__ import annotations

import collections
import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Optional

from .._wire import _features
from .._wire import _protocol as proto
from .._wire._channel import Link
from .._wire._memory import resident_bytes
from .._wire._namespace import FunctionCache, MainNamespace
from .._wire._batching import BATCH_ITEMS, HOLD_BYTES, HOLD_SECONDS
from .._wire._protocol import Item, Kind
from .._wire._serialize import (
    NotKept,
    decode_call,
    encode_result,
    explain_load_failure,
    loads,
)
from .._wire._shm import Unmappable, map_frames

# How often a task process looks for a vanished supervisor when nothing happens.
PARENT_CHECK_INTERVAL = 0.5

# A process that has just replied to a LONE_TASK (a caller waits for each reply before it sends its
# next task) looks for the next task this long without sleeping, when it has a CPU of its own. Such a
# caller's next task typically follows its result within a few hundred µs; found awake, the process
# spares its sender a wake-up, which on a VM costs the sender tens of µs in the system call. Longer
# catches slower callers but burns a CPU for nothing when none comes. Never for other tasks: in a
# burst, the spin takes a CPU the client needs (10% fewer no-ops/s here when every idle spell spun).
IDLE_SPIN_SECONDS = 0.0003

# Most text of each stream kept per task for the client; the rest still reaches the worker's own
# stdout and stderr.
OUTPUT_LIMIT = 64 * 1024

# Seconds between forwarding the new, complete lines a running task wrote. Shorter shows them to the
# client sooner, at the cost of one more message per interval for every task that keeps printing.
OUTPUT_INTERVAL = 0.5

# Clients whose __main__ namespaces a task process keeps (see MainNamespace); beyond, the least
# recently served one is forgotten (its functions' globals start afresh if it comes back).
MAX_CLIENT_NAMESPACES = 16

_PR_SET_PDEATHSIG = 1

# A relayed task process that gets a SIGTERM its supervisor did not announce waits this long for the
# supervisor to begin draining before it takes the signal as meant for itself alone and dies of it.
# Clusters stop a worker by signalling all its processes at once (Slurm, systemd's control group, a
# process group), in any order: the supervisor's drain then lets the running task finish. Longer covers
# a slower supervisor; it is also how much later a task that sends itself SIGTERM dies of it.
UNANNOUNCED_SIGTERM_WAIT = 1.0

# The counters shared with the supervisor: tasks started and finished; set once started up; set when
# it exits because it was told to (STOP), not because of a task; while a task with a time limit runs,
# when it must end (time.monotonic_ns(), which every process of the host shares) and the limit (ms);
# set by the supervisor before it sends SIGTERM on purpose (TERM_OK), and while it drains (DRAINING);
# the resident size (bytes) above max_memory_per_child it found after a task, when that retired it.
STARTED, FINISHED, UP, RETIRED, DEADLINE, LIMIT_MS, TERM_OK, DRAINING, OVER_MEMORY = range(9)
COUNTERS = 9


def _die_with_parent(parent_pid: int) -> None:
    if _features.PDEATHSIG:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            _watch_parent(parent_pid)
    else:
        _watch_parent(parent_pid)
    if os.getppid() != parent_pid:
        os._exit(0)


def _watch_parent(parent_pid: int) -> None:
    """Without prctl: a thread that ends this process (as the SIGKILL prctl would send) once its parent
    is gone, even while a task runs."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_CHECK_INTERVAL)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="zmqexecutor-parent-watch", daemon=True).start()


def _hold_unannounced_sigterm(counters: Any) -> None:
    """SIGTERM ends this process only when the supervisor sent it, or when the supervisor does not begin
    to drain within UNANNOUNCED_SIGTERM_WAIT: a SIGTERM to the whole worker leaves its tasks running."""

    ours = os.getpid()

    def on_sigterm(signum: int, frame: Any) -> None:
        deadline = time.monotonic() + UNANNOUNCED_SIGTERM_WAIT
        while not counters[TERM_OK] and os.getpid() == ours:  # a task's forked child dies at once
            if counters[DRAINING]:
                return  # the supervisor ends us once the task is done, or its drain timeout passed
            if time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)


class _Capture:
    """Stands in for sys.stdout or sys.stderr: keeps the current task's text for the client, and
    writes it through to the real stream too (``echo``) or only what is past the part kept."""

    def __init__(self, stream: Any, echo: bool) -> None:
        self.stream = stream
        self.echo = echo
        self.lock = threading.Lock()  # the task's own threads may print while its output is forwarded
        self.parts: list[str] = []
        self.size = 0  # kept for the current task so far, forwarded or not
        self.truncated = False

    def write(self, text: str) -> int:
        if self.echo and self.stream is not None:
            self.stream.write(text)
        with self.lock:
            kept = text[:max(0, OUTPUT_LIMIT - self.size)]
            if len(kept) < len(text):
                self.truncated = True
                if not self.echo and self.stream is not None:
                    self.stream.write(text[len(kept):])
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
        if self.size or self.parts or self.truncated:
            with self.lock:
                self.parts, self.size, self.truncated = [], 0, False

    def take(self, whole_lines: bool) -> str:
        """The text not yet taken; with ``whole_lines``, a last unfinished line stays for later."""
        if not self.parts:  # nothing written: no need to take the lock
            return ""
        with self.lock:
            text = "".join(self.parts)
            end = text.rfind("\n") + 1 if whole_lines else len(text)
            self.parts = [text[end:]] if end < len(text) else []
        return text[:end]


class TaskLoop:
    """Receive tasks, run them in order, reply; stream a running task's output meanwhile."""

    def __init__(self, sock: Link, host: str, pid: int, counters: Any, echo: bool = True,
                 spin: float = 0.0, memory_per_child: Optional[int] = None) -> None:
        self.sock = sock
        self.memory_per_child = memory_per_child
        self.spin = spin
        self.host = host
        self.pid = pid
        self.where = f"host {host} (task process {pid})"
        self.counters = counters
        self.functions = FunctionCache()
        # Per client, the most recent ones first; a long-lived worker forgets the oldest.
        self.namespaces: collections.OrderedDict[bytes, MainNamespace] = collections.OrderedDict()
        self.queue: collections.deque[Item] = collections.deque()
        self.failed_init: dict[bytes, list[Any]] = {}  # client -> its INIT_FAILED frames
        self.held: list[Item] = []
        self.held_bytes = 0
        self.held_since = 0.0
        self.stopping = False
        self.stdout, self.stderr = _Capture(sys.stdout, echo), _Capture(sys.stderr, echo)
        # The socket belongs to the main thread, except while a task runs: then the forwarder may send
        # that task's output on it. The lock hands it over, so two messages never interleave.
        self.socket_lock = threading.Lock()
        self.running: Optional[int] = None
        self.forwarder: Optional[threading.Thread] = None
        # Set when a task starts while replies are held: the forwarder sends them if the task then
        # running (armed_for) still runs once they have waited HOLD_SECONDS, so that they never wait
        # for the end of a long task. The forwarder takes the socket only then: the tiny tasks of a
        # batch are over long before, and taking it from the main thread for each had cost more
        # than those tasks themselves.
        self.held_waiting = threading.Event()
        self.armed_for: Optional[int] = None
        # A task may fork (multiprocessing): the child must not inherit a lock the forwarder held.
        os.register_at_fork(after_in_child=self.forget_locks)

    def forget_locks(self) -> None:
        self.stdout.lock = threading.Lock()
        self.stderr.lock = threading.Lock()

    def serve(self, supervisor_pid: int) -> None:
        sys.stdout, sys.stderr = self.stdout, self.stderr
        self.socket_lock.acquire()
        lone = False  # the last read brought one LONE_TASK alone
        while True:
            if not self.queue:
                self.send_held()
                if self.stopping:
                    self.counters[RETIRED] = 1
                    return
                found = lone and self.spin > 0 and self.sock.look_for(self.spin)
                lone = False
                if not found and not self.sock.poll(PARENT_CHECK_INTERVAL):
                    if os.getppid() != supervisor_pid:
                        return
                    continue
                # Only when the queue ran dry: a read per task would mostly find nothing (a system
                # call and an exception each), and what waits in the socket is no more urgent.
                lone = self.receive() and len(self.queue) == 1
                if self.sock.closed:
                    return  # whoever fed us is gone, and nobody is left to take a reply
            if self.queue:
                self.run_next()

    def receive(self) -> bool:
        """Queue what arrived; True if a LONE_TASK did."""
        lone = False
        for frames in self.sock.receive():
            header = proto.decode_header(frames[0])
            if header.kind == Kind.STOP:
                self.stopping = True
            elif header.kind == Kind.LONE_TASK:
                lone = True
                self.queue.append(proto.Item(Kind.TASK, header.ident, frames[1:]))
            else:
                self.queue.extend(item for item in proto.split(header, frames) if item.kind == Kind.TASK)
        return lone

    def run_next(self) -> None:
        task_id, frames = self.queue[0].ident, self.queue[0].frames
        self.queue.popleft()
        self.counters[STARTED] += 1
        reply = self.run(task_id, frames)
        del frames
        output = self.take_output(task_id, whole_lines=False)
        self.hold([output, reply] if output else [reply])
        self.counters[FINISHED] += 1
        del reply
        if self.memory_per_child is not None:
            self.retire_if_too_big(self.memory_per_child)

    def retire_if_too_big(self, limit: int) -> None:
        """Past ``limit`` after a task (a leak, or a cache that only grows), stop before the next one:
        the tasks queued here were never started, and whoever sent them sends them again."""
        size = resident_bytes()
        if size is not None and size > limit:
            self.counters[OVER_MEMORY] = size
            self.stopping = True
            self.queue.clear()

    def run(self, task_id: int, frames: Any) -> Item:
        client, init_blob, call = proto.decode_process_task(frames)
        if client in self.failed_init:
            return Item(Kind.INIT_FAILED, task_id, self.failed_init[client])
        self.stdout.begin()
        self.stderr.begin()
        if self.forwarder is None:
            self.forwarder = threading.Thread(target=self.forward_output, name="zmqexecutor-output", daemon=True)
            self.forwarder.start()
        self.running = task_id
        namespace = self.namespace(client)
        if self.held:
            self.armed_for = task_id
            if not self.held_waiting.is_set():
                self.held_waiting.set()
        self.socket_lock.release()
        try:
            if len(proto.as_buffer(init_blob)):
                try:
                    try:
                        initializer, initargs = loads([init_blob])
                    except BaseException as exc:
                        explain_load_failure(exc, self.where)
                        raise
                    namespace.adopt(initializer)(*initargs)
                except BaseException as exc:
                    reply = self.exception(Kind.INIT_FAILED, task_id, exc)
                    self.failed_init[client] = list(reply.frames)
                    return reply
            return self.call(task_id, call, namespace)
        finally:
            self.socket_lock.acquire()
            self.running = None

    def namespace(self, client: bytes) -> MainNamespace:
        namespace = self.namespaces.pop(client, None) or MainNamespace()
        self.namespaces[client] = namespace
        if len(self.namespaces) > MAX_CLIENT_NAMESPACES:
            self.namespaces.popitem(last=False)
        return namespace

    def call(self, task_id: int, frames: Any, namespace: MainNamespace) -> Item:
        try:
            fn, args, kwargs, limit = decode_call(map_frames(frames), self.functions.load)
        except (NotKept, Unmappable):  # let go since (here, or by the supervisor): the client sends it again
            return Item(Kind.MISSING, task_id, [])
        except BaseException as exc:
            explain_load_failure(exc, self.where)
            return self.exception(Kind.EXCEPTION, task_id, exc)
        if limit is not None:  # the supervisor ends this process if it is still running then
            self.counters[LIMIT_MS] = max(1, round(limit * 1000))
            self.counters[DEADLINE] = time.monotonic_ns() + round(limit * 1e9)
        try:
            result = namespace.adopt(fn)(*args, **kwargs)
        except BaseException as exc:
            return self.exception(Kind.EXCEPTION, task_id, exc)
        finally:
            if limit is not None:
                self.counters[DEADLINE] = 0
        del fn, args, kwargs
        try:
            return Item(Kind.RESULT, task_id, encode_result(result))
        except BaseException as exc:
            return self.exception(Kind.EXCEPTION, task_id, exc)

    def exception(self, kind: Kind, task_id: int, exc: BaseException) -> Item:
        return Item(kind, task_id, proto.encode_exception(exc, host=self.host, pid=self.pid))

    def hold(self, items: list[Item]) -> None:
        if not self.held:
            self.held_since = time.monotonic()
        self.held.extend(items)
        for item in items:
            self.held_bytes += sum(map(len, item.frames))
        # Replies wait while more tasks are queued here, to go back together (limits: _batching).
        if (not self.queue or len(self.held) >= BATCH_ITEMS or self.held_bytes >= HOLD_BYTES
                or time.monotonic() - self.held_since >= HOLD_SECONDS):
            self.send_held()

    def send_held(self) -> None:
        if self.held:
            self.sock.send(proto.encode_messages(self.held))
            self.held, self.held_bytes = [], 0
        self.armed_for = None

    def forward_output(self) -> None:
        while True:
            if self.held_waiting.wait(OUTPUT_INTERVAL):
                self.held_waiting.clear()
                time.sleep(max(0.0, self.held_since + HOLD_SECONDS - time.monotonic()))
                armed_for = self.armed_for
                if armed_for is not None and self.running == armed_for:  # without the lock: mostly over
                    with self.socket_lock:
                        if self.running == armed_for:  # it still runs: its predecessors' replies go now
                            self.send_held()
                continue
            with self.socket_lock:
                if self.running is not None:
                    item = self.take_output(self.running, whole_lines=True)
                    if item is not None:
                        self.sock.send(proto.encode_messages([item]))

    def take_output(self, task_id: int, *, whole_lines: bool) -> Optional[Item]:
        out, err = self.stdout.take(whole_lines), self.stderr.take(whole_lines)
        if not (out or err):
            return None
        frames = proto.encode_output(task_id, stdout=out, stderr=err, host=self.host, pid=self.pid,
                                     truncated=self.stdout.truncated or self.stderr.truncated)
        return Item(Kind.OUTPUT, task_id, frames[1:])


def task_process_main(address: str, supervisor_pid: int, counters: Any, echo: bool = True,
                      spin: bool = False, drains: bool = True, memory_per_child: Optional[int] = None) -> None:
    """``drains``: our supervisor drains on SIGTERM (not the embedded worker's); ``memory_per_child``:
    the resident size past which this process stops after a task, to be replaced."""
    _die_with_parent(supervisor_pid)
    # Ctrl-C in a terminal reaches the whole process group; the supervisor decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if drains:
        _hold_unannounced_sigterm(counters)
    # The supervisor starts us as daemons (reaped with it); tasks may still start processes of their
    # own, as they can in ProcessPoolExecutor's workers, which multiprocessing forbids to daemons.
    multiprocessing.current_process().daemon = False
    pid = os.getpid()
    # Whoever listens (the client, for a direct worker) may do so a moment after we start.
    sock = Link(address, give_up=lambda: os.getppid() != supervisor_pid)
    sock.send(proto.encode_ready(pid))
    counters[UP] = 1
    # A forked task process inherits the supervisor's log handlers, which write to the real stderr;
    # without them, the tasks' own logging goes through sys.stderr and is captured with their prints.
    logging.root.handlers.clear()
    try:
        TaskLoop(sock, socket.gethostname(), pid, counters, echo,
                 spin=IDLE_SPIN_SECONDS if spin else 0.0, memory_per_child=memory_per_child).serve(supervisor_pid)
    finally:
        sock.close()
