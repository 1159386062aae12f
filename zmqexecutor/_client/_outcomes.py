"""What becomes of each task: the client's one place that resolves and fails futures.

Runs in the client's I/O thread, or a user thread that holds the engine's lock (_caller).

Data flow::

    Engine (I/O thread)
      a reply: RESULT EXCEPTION CRASHED INIT_FAILED DROPPED LOST, or OUTPUT -----> Outcomes.reply
          (found in flight by the Scheduler; late and duplicate ones fall through)   -> set_result,
      a task process that ended (EXITED), its tasks sorted out by DirectLanes ---> .process_ended
      a worker lost: its tasks in flight retried, or failed once out of retries ----> .worker_lost
      tasks that waited for a worker too long, or for one that can never take them --> .expire
                                                                                       set_exception

A task is resolved by the worker it is in flight on, once: the scheduler hands a reply's task over
only while it is in flight there. Anything that breaks the whole executor (an initializer that
failed) goes back to the engine's ``break_executor``, which fails every future it still holds.
"""

from __future__ import annotations

import logging
import sys
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from .._wire import _protocol as proto
from .._wire._errors import (
    BrokenWorkerPool,
    MemoryLimitError,
    MessageTooLargeError,
    NoWorkersError,
    ResourcesUnavailableError,
    TaskCrashedError,
    TaskTimeoutError,
    VersionMismatchError,
    WorkerLostError,
)
from .._wire._memory import format_size
from .._wire._protocol import Kind
from .._wire._resources import describe
from ._scheduler import Load, Scheduler, Task

# A task answered MISSING this often goes on as plain frames, naming nothing: a buffer let go is
# answered MISSING once, but a process that cannot map what is kept (no access to /proc/PID/fd, say)
# would answer it every time, and the task would go back and forth for ever.
MISSED_BEFORE_PLAIN = 3

# An error names at most this many endpoints (or reasons), then how many more there were: a fleet of a
# thousand must not make a message of a thousand lines.
LISTED_AT_MOST = 5

if TYPE_CHECKING:
    from ._connection import Connection

logger = logging.getLogger("zmqexecutor")
# What tasks print on their workers, forwarded here (INFO) with ZMQExecutor(task_output="log").
task_logger = logging.getLogger("zmqexecutor.task")

_REPLIES = frozenset({Kind.RESULT, Kind.EXCEPTION, Kind.CRASHED, Kind.INIT_FAILED, Kind.DROPPED, Kind.LOST})

# A Future's states once it has its outcome (concurrent.futures._base, unchanged since Python 3.2).
_DONE_STATES = frozenset({"CANCELLED", "CANCELLED_AND_NOTIFIED", "FINISHED"})


class Outcomes:
    """Turns what the workers say, and what becomes of them, into results and errors on futures."""

    def __init__(self, scheduler: Scheduler, settings: Any, *, local: bool,
                 break_executor: Callable[[BaseException], None]) -> None:
        self.scheduler = scheduler
        self.settings = settings
        self.local = local
        self.break_executor = break_executor

    def reply(self, load: Load, kind: Kind, ident: int, rest: Any, now: float) -> bool:
        """Take a task's reply or output from ``load``'s worker; False if the message is neither."""
        if kind in _REPLIES:
            task = self.scheduler.finished(load, ident, now)
            if task is None:
                logger.debug("ignored a late or duplicate %s for task %d from %s", kind.name, ident, load.name)
            elif settled(task, kind.name):
                pass  # cancelled by force (ZMQExecutor.cancel): whatever it came to is not wanted
            elif kind == Kind.LOST:
                why = proto.decode_reason(rest)
                logger.warning("task %d lost on worker %s: %s", ident, load.name, why)
                self.lost(self.scheduler.retry(load, [task]), why)
            else:
                broken = resolve(task.future, kind, rest, load.name)
                if broken is not None:
                    self.break_executor(broken)
        elif kind == Kind.RETURNED:
            self.scheduler.returned(load, ident)
        elif kind == Kind.MISSING:  # it let go of a buffer it kept for us: again, with the buffer
            load.owner.forget_held()
            task = load.inflight.get(ident)
            if task is not None:
                task.missed += 1
                if task.missed >= MISSED_BEFORE_PLAIN:  # markers cannot reach that process: no more of them
                    task.keepable = ()
            self.scheduler.returned(load, ident)
        elif kind == Kind.OUTPUT:
            if ident in load.inflight:
                show_output(self.settings.task_output, load.name, ident, proto.decode_output(rest), local=self.local)
        else:
            return False
        return True

    def process_ended(self, ending: Any, info: dict[str, Any], endpoint: str, *, stopping: bool) -> None:
        """A local task process ended (``ending``: its tasks, sorted by what its counters say)."""
        if ending.running is not None:
            fail(ending.running, crash_error(endpoint, info))
        if ending.ran:
            _, how = proto.describe_exit(info.get("exitcode"))
            why = f"its reply was lost when task process {info['pid']} {how} in a later task"
            logger.warning("%d task(s) lost on worker %s: %s", len(ending.ran), endpoint, why)
            self.lost(ending.failed, why)
        if stopping:
            for task in ending.unstarted:
                fail(task, BrokenWorkerPool("the task was dropped before it started: its client stopped the workers"))

    def worker_lost(self, conn: "Connection", why: str, *, retry: bool) -> None:
        """``conn``'s worker is lost (or restarted): its tasks in flight go back to the backlog, and
        those lost too often already (or all, without ``retry``) fail."""
        scheduler = self.scheduler
        inflight = len(conn.load.inflight) + (conn.lanes.in_flight() if conn.lanes is not None else 0)
        failed = scheduler.detach(conn.load, why, retry=retry)
        if conn.lanes is not None:  # its task processes went with it
            failed += conn.lanes.detach_all(scheduler, why, retry=retry)
        if conn.load.draining and not inflight:  # as it said it would: no loss
            logger.info("worker %s finished draining and left", conn.address)
        else:
            logger.warning("lost worker %s (%s) with %d task(s) in flight", conn.address, why, inflight)
        self.lost(failed, why)

    def too_large(self, task: Task, load: Load) -> None:
        fail(task, MessageTooLargeError(f"the task is {task.size} bytes, more than worker {load.name} accepts "
                                        f"(its --max-message-size is {load.max_task_bytes})"))

    def lost(self, failed: list[tuple[Task, str]], why: str) -> None:
        """Tasks lost with their workers once too often: they fail."""
        for task, lost_on in failed:
            if settled(task, "lost"):  # cancelled by force meanwhile
                continue
            task.future.set_exception(WorkerLostError(
                f"the task was lost with {len(task.lost_on)} worker(s): {lost_on} "
                f"(max_retries={self.settings.max_retries}); last: {why}", tuple(task.lost_on)))

    def expire(self, connections: list[Any], addresses: list[str], *, listening: Optional[str] = None) -> None:
        """With no worker ready: fail what waits if no worker can ever take it (unless another may
        still dial in at ``listening``), else what waited longer than ``connect_timeout``."""
        scheduler = self.scheduler
        reasons = _summary([f"{c.address}: {c.error}" for c in connections if c.error is not None], "; ")
        if listening is not None:
            addresses = addresses + [f"listening at {listening}"]
        elif all(conn.state == conn.INCOMPATIBLE for conn in connections):
            errors = "; ".join(str(conn.error) for conn in connections)
            for task in scheduler.take_backlog():
                fail(task, VersionMismatchError(errors))
            return
        if listening is None and all(conn.definitely_unusable for conn in connections):
            # Waiting out connect_timeout would change nothing: keys or versions are wrong everywhere.
            for task in scheduler.take_backlog():
                error = NoWorkersError(f"no worker can be used{reasons}")
                error.__cause__ = connections[0].error
                fail(task, error)
            return
        timeout = self.settings.connect_timeout
        expired = scheduler.expire(time.monotonic(), timeout)
        if expired:
            message = (f"no worker became reachable within connect_timeout={timeout:g} s "
                       f"(endpoints: {_summary(addresses, ', ').lstrip(', ')}){reasons}")
            for task in expired:
                fail(task, NoWorkersError(message))


    def expire_unmet(self, now: float) -> None:
        """Fail the tasks whose resources no ready worker offered for ``connect_timeout``."""
        timeout = self.settings.connect_timeout
        expired = self.scheduler.expire_unmet(now, timeout)
        if not expired:
            return
        offers = [f"{name}: {describe(amounts)}" for name, amounts in self.scheduler.offered()]
        offered = f"the ready workers offer {_summary(offers, '; ').lstrip('; ')}" if offers else "no worker is ready"
        for task in expired:
            assert task.needs is not None
            fail(task, ResourcesUnavailableError(
                f"no worker offered the resources this task needs ({describe(task.needs)}) within "
                f"connect_timeout={timeout:g} s; {offered}", needs=dict(task.needs)))


def _summary(items: list[str], separator: str) -> str:
    """``items``, each after ``separator``, the first LISTED_AT_MOST of them and a count of the rest."""
    shown = "".join(separator + item for item in items[:LISTED_AT_MOST])
    rest = len(items) - LISTED_AT_MOST
    return shown + (f"{separator}and {rest} more" if rest > 0 else "")


def resolve(future: "Future[Any]", kind: Kind, frames: Any, endpoint: str) -> Optional[BrokenWorkerPool]:
    """Resolve ``future`` with a reply; returns the error to break the executor with, if any."""
    try:
        if kind == Kind.RESULT:
            future.set_result(proto.loads(frames))
        elif kind == Kind.EXCEPTION:
            future.set_exception(proto.decode_exception(frames, endpoint=endpoint))
        elif kind == Kind.CRASHED:
            future.set_exception(crash_error(endpoint, proto.decode_crash(frames)))
        elif kind == Kind.DROPPED:
            future.set_exception(BrokenWorkerPool(proto.decode_reason(frames)))
        else:
            broken = BrokenWorkerPool("A task process initializer failed, the executor is not usable anymore")
            broken.__cause__ = proto.decode_exception(frames, endpoint=endpoint)
            future.set_exception(broken)
            return broken
    except BaseException as exc:  # even SystemExit from a result's __setstate__ fails one future only
        if not future.done():
            error = proto.ProtocolError(f"the reply could not be decoded: {exc!r}")
            error.__cause__ = exc
            future.set_exception(error)
    return None


def crash_error(endpoint: str, info: dict[str, Any]) -> Union[TaskCrashedError, TaskTimeoutError]:
    signal_name, how = proto.describe_exit(info.get("exitcode"))
    host, pid = info.get("host", "?"), info.get("pid", 0)
    peak, limit_bytes = info.get("peak_memory"), info.get("memory_limit")
    peak = peak if isinstance(peak, int) and not isinstance(peak, bool) else 0
    if isinstance(limit_bytes, int) and not isinstance(limit_bytes, bool):
        return MemoryLimitError(
            f"the task's process (pid {pid} on host {host}, worker {endpoint}) held {format_size(peak)}, "
            f"above the worker's memory limit of {format_size(limit_bytes)}; the worker killed it and "
            "replaced it", limit=limit_bytes, peak=peak, exitcode=info.get("exitcode"), signal=signal_name,
            host=str(host), pid=int(pid) if isinstance(pid, int) else 0, endpoint=endpoint)
    if info.get("oom_killed") is True:
        seen = f"; it held {format_size(peak)} when last seen" if peak else ""
        how += (" by the kernel's out-of-memory killer (the host's control group counted an OOM kill), most "
                f"likely for using too much memory{seen}")
    limit = info.get("timed_out")
    if isinstance(limit, (int, float)) and not isinstance(limit, bool):
        return TaskTimeoutError(
            f"the task ran longer than its time limit of {limit:g} s; the worker ended its process (pid {pid} "
            f"on host {host}, worker {endpoint}) and replaced it", limit=float(limit), host=str(host),
            pid=int(pid) if isinstance(pid, int) else 0, endpoint=endpoint)
    message = f"the task process (pid {pid} on host {host}, worker {endpoint}) {how} while running " \
              "this task; the worker replaced it"
    return TaskCrashedError(message, exitcode=info.get("exitcode"), signal=signal_name, host=str(host),
                            pid=int(pid) if isinstance(pid, int) else 0, endpoint=endpoint)


def show_output(mode: str, endpoint: str, task_id: int, output: dict[str, Any], *, local: bool) -> None:
    """What a task printed: on this process's own stdout and stderr (``mode`` "print"), each line
    tagged with the task process (and host, for a remote one); or as records of the task logger."""
    if mode == "log":
        tag = f"[{endpoint} pid {output.get('pid')}]"
    else:
        tag = f"(pid={output.get('pid')})" if local else f"(pid={output.get('pid')}, host={output.get('host')})"
    for stream in ("stdout", "stderr"):
        text = output[stream].rstrip("\n")
        if not text:
            continue
        lines = [f"{tag} {line}" for line in text.split("\n")]
        if mode == "log":
            more = " (truncated)" if output.get("truncated") else ""
            task_logger.info("task %d %s%s:\n%s", task_id, stream, more, "\n".join(lines))
            continue
        if output.get("truncated"):
            lines.append(f"{tag} [zmqexecutor: output cut at 64 KiB per stream and task; the worker's own log has it all]")
        target = sys.stdout if stream == "stdout" else sys.stderr
        try:
            target.write("\n".join(lines) + "\n")
            target.flush()
        except (OSError, ValueError, AttributeError):
            pass  # a closed or missing stream: nowhere to show it


def fail(task: Task, error: BaseException) -> None:
    if (task.started or task.future.set_running_or_notify_cancel()) and not settled(task, type(error).__name__):
        task.future.set_exception(error)


def settled(task: Task, what: str) -> bool:
    """Whether the task's future has its outcome already. Cancelled is expected (by its user, or by
    force); anything else would mean a second outcome for one task, which must never happen: it is
    logged as an error, so that tests can see it (a Future refuses it silently)."""
    if task.future._state not in _DONE_STATES:  # done(), without taking its lock
        return False
    if not task.future.cancelled():
        logger.error("task %d already had its outcome; a second one (%s) was ignored", task.ident, what)
    return True


def copy_error(error: BaseException) -> BaseException:
    # Each future gets its own exception object, so that tracebacks raised from one do not pile up
    # on the others.
    try:
        copy = type(error)(*error.args)
    except Exception:
        return error
    copy.__cause__ = error.__cause__
    return copy
