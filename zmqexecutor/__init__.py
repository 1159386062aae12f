"""zmqexecutor: a ``concurrent.futures.Executor`` that runs Python functions on many machines over ZeroMQ."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._client._connection import WorkerInfo  # noqa: E402
from ._executor import (  # noqa: E402
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_MAX_RETRIES,
    DEFAULT_WORKER_TIMEOUT,
    TaskOptions,
    ZMQExecutor,
)
from ._wire._errors import (  # noqa: E402
    BrokenWorkerPool,
    LaunchError,
    MessageTooLargeError,
    NoWorkersError,
    RemoteError,
    RemoteTraceback,
    SecurityError,
    TaskCrashedError,
    TaskTimeoutError,
    VersionMismatchError,
    WorkerLostError,
    ZMQExecutorError,
)
from ._wire._version import __version__

if TYPE_CHECKING:
    from ._tools._launchers import SlurmWorkers, SSHWorkers


def __getattr__(name: str) -> Any:
    # The launchers (and what they import) load when first used, not with every `import zmqexecutor`.
    if name in ("SSHWorkers", "SlurmWorkers"):
        from ._tools import _launchers
        return getattr(_launchers, name)
    raise AttributeError(f"module 'zmqexecutor' has no attribute {name!r}")


__all__ = [
    "ZMQExecutor",
    "TaskOptions",
    "WorkerInfo",
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
    "TaskTimeoutError",
    "BrokenWorkerPool",
    "NoWorkersError",
    "VersionMismatchError",
    "WorkerLostError",
    "SecurityError",
    "MessageTooLargeError",
    "LaunchError",
    "__version__",
]
