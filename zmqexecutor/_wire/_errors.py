"""The exceptions a user of zmqexecutor can see.

Runs in any process and thread.
"""

from __future__ import annotations

from concurrent.futures import BrokenExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Optional

__all__ = [
    "ZMQExecutorError",
    "RemoteTraceback",
    "RemoteError",
    "TaskCrashedError",
    "MemoryLimitError",
    "BrokenWorkerPool",
    "NoWorkersError",
    "ResourcesUnavailableError",
    "WorkerLostError",
    "VersionMismatchError",
    "SecurityError",
    "MessageTooLargeError",
    "TaskTimeoutError",
    "LaunchError",
]


class ZMQExecutorError(Exception):
    """Raised as the base class of every error zmqexecutor defines itself."""


class RemoteTraceback(Exception):
    """Raised as the ``__cause__`` of a task's exception: the traceback text from the worker."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class RemoteError(ZMQExecutorError):
    """Raised when a task's exception cannot be pickled on the worker or unpickled on the client."""

    def __init__(self, type_name: str, message: str, traceback_text: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text

    def __reduce__(self) -> tuple[type[RemoteError], tuple[str, str, str]]:
        return (type(self), (self.type_name, self.message, self.traceback_text))


class TaskCrashedError(BrokenProcessPool, ZMQExecutorError):
    """Raised when the process running a task died before replying (signal, ``os._exit``, OOM kill).

    Only the one task's future fails; the worker replaces the process and the executor stays usable.
    It subclasses ``BrokenProcessPool`` so that code written for ProcessPoolExecutor still catches it.
    """

    def __init__(
        self,
        message: str,
        *,
        exitcode: int | None = None,
        signal: str | None = None,
        host: str = "",
        pid: int = 0,
        endpoint: str = "",
    ) -> None:
        super().__init__(message)
        self.exitcode = exitcode
        self.signal = signal
        self.host = host
        self.pid = pid
        self.endpoint = endpoint


class MemoryLimitError(TaskCrashedError):
    """Raised when a task's process held more memory than its worker's memory limit while it ran the
    task (``--memory-limit``, ``memory_limit=``): the worker killed that process and started another."""

    def __init__(self, message: str, *, limit: int = 0, peak: int = 0, **where: Any) -> None:
        super().__init__(message, **where)
        self.limit = limit
        self.peak = peak

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_memory_limit, (str(self), self.limit, self.peak, self.exitcode, self.signal, self.host,
                                        self.pid, self.endpoint))


def _rebuild_memory_limit(message: str, limit: int, peak: int, exitcode: Optional[int], signal: Optional[str],
                          host: str, pid: int, endpoint: str) -> MemoryLimitError:
    return MemoryLimitError(message, limit=limit, peak=peak, exitcode=exitcode, signal=signal, host=host, pid=pid,
                            endpoint=endpoint)


class TaskTimeoutError(TimeoutError, ZMQExecutorError):
    """Raised when a task ran longer than its time limit: the worker ended its process (and only that
    one) and started another. The task is not retried."""

    def __init__(self, message: str, *, limit: float = 0.0, host: str = "", pid: int = 0, endpoint: str = "") -> None:
        super().__init__(message)
        self.limit = limit
        self.host = host
        self.pid = pid
        self.endpoint = endpoint

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_timeout, (str(self), self.limit, self.host, self.pid, self.endpoint))


def _rebuild_timeout(message: str, limit: float, host: str, pid: int, endpoint: str) -> TaskTimeoutError:
    return TaskTimeoutError(message, limit=limit, host=host, pid=pid, endpoint=endpoint)


class BrokenWorkerPool(BrokenProcessPool, ZMQExecutorError):
    """Raised when the executor can run no more tasks: failed initializer, local worker that keeps dying, stop."""


class NoWorkersError(BrokenExecutor, ZMQExecutorError):
    """Raised when a task waited longer than ``connect_timeout`` without any worker being reachable."""


class ResourcesUnavailableError(NoWorkersError):
    """Raised when no connected worker offered the resources a task needs (``options(resources=...)``)
    within ``connect_timeout``; ``needs`` is what it asked for. The executor stays usable."""

    def __init__(self, message: str, *, needs: Optional[dict[str, float]] = None) -> None:
        super().__init__(message)
        self.needs = dict(needs or {})

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_unavailable, (str(self), self.needs))


def _rebuild_unavailable(message: str, needs: dict[str, float]) -> ResourcesUnavailableError:
    return ResourcesUnavailableError(message, needs=needs)


class WorkerLostError(BrokenExecutor, ZMQExecutorError):
    """Raised when a task was in flight on more lost workers than ``max_retries`` allows."""

    def __init__(self, message: str, endpoints: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.endpoints = endpoints

    def __reduce__(self) -> tuple[type[WorkerLostError], tuple[str, tuple[str, ...]]]:
        return (type(self), (str(self), self.endpoints))


class VersionMismatchError(ZMQExecutorError):
    """Raised when a worker speaks a different protocol, Python or cloudpickle version than the client."""


class SecurityError(ZMQExecutorError):
    """Raised when security cannot be set up: a missing, malformed or exposed key, or an unsafe libzmq."""


class MessageTooLargeError(ZMQExecutorError, ValueError):
    """Raised when a task or its result is bigger than ``max_message_size`` allows."""


class LaunchError(ZMQExecutorError):
    """Raised when a launcher cannot start its workers: a host or a job that failed, or did not start in time."""


class ProtocolError(ValueError):
    """Raised when a message does not follow the wire protocol; it is logged and dropped."""
