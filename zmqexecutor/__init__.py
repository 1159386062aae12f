"""zmqexecutor: a ``concurrent.futures.Executor`` that runs Python functions on many machines over ZeroMQ.

The public API is re-exported here and nowhere else. Each name loads its module when it is first
used: ``import zmqexecutor`` alone loads nothing else, so that the worker program
(``python -m zmqexecutor worker``), which shares this package, starts without loading the client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._wire._version import __version__

if TYPE_CHECKING:
    from ._client._connection import WorkerInfo
    from ._client._reuse import Shared
    from ._executor import (
        DEFAULT_CONNECT_TIMEOUT,
        DEFAULT_MAX_MESSAGE_SIZE,
        DEFAULT_MAX_RETRIES,
        DEFAULT_WORKER_TIMEOUT,
        TaskOptions,
        ZMQExecutor,
    )
    from ._tools._launchers import SlurmWorkers, SSHWorkers
    from ._wire._errors import (
        BrokenWorkerPool,
        LaunchError,
        MemoryLimitError,
        MessageTooLargeError,
        NoWorkersError,
        ResourcesUnavailableError,
        RemoteError,
        RemoteTraceback,
        SecurityError,
        TaskCrashedError,
        TaskTimeoutError,
        VersionMismatchError,
        WorkerLostError,
        ZMQExecutorError,
    )

_ERRORS = ("ZMQExecutorError", "RemoteError", "RemoteTraceback", "TaskCrashedError", "MemoryLimitError",
           "TaskTimeoutError", "BrokenWorkerPool", "NoWorkersError", "ResourcesUnavailableError", "VersionMismatchError", "WorkerLostError", "SecurityError",
           "MessageTooLargeError", "LaunchError")
_EXECUTOR = ("ZMQExecutor", "TaskOptions", "DEFAULT_CONNECT_TIMEOUT", "DEFAULT_MAX_MESSAGE_SIZE",
             "DEFAULT_MAX_RETRIES", "DEFAULT_WORKER_TIMEOUT")

# Where each public name lives.
_HOMES = {
    **dict.fromkeys(_EXECUTOR, "._executor"),
    **dict.fromkeys(_ERRORS, "._wire._errors"),
    "WorkerInfo": "._client._connection",
    "Shared": "._client._reuse",
    "SSHWorkers": "._tools._launchers",
    "SlurmWorkers": "._tools._launchers",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'zmqexecutor' has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "ZMQExecutor",
    "TaskOptions",
    "WorkerInfo",
    "Shared",
    "SSHWorkers",
    "SlurmWorkers",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_WORKER_TIMEOUT",
    "ZMQExecutorError",
    "RemoteError",
    "RemoteTraceback",
    "TaskCrashedError",
    "MemoryLimitError",
    "TaskTimeoutError",
    "BrokenWorkerPool",
    "NoWorkersError",
    "ResourcesUnavailableError",
    "VersionMismatchError",
    "WorkerLostError",
    "SecurityError",
    "MessageTooLargeError",
    "LaunchError",
    "__version__",
]
