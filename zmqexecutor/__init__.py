"""zmqexecutor: a ``concurrent.futures.Executor`` that runs Python functions on many machines over ZeroMQ."""

from __future__ import annotations

__version__ = "0.1.0"

from ._errors import (  # noqa: E402
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
from ._executor import (  # noqa: E402
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_MAX_RETRIES,
    DEFAULT_WORKER_TIMEOUT,
    TaskOptions,
    ZMQExecutor,
)
from ._connection import WorkerInfo  # noqa: E402
from ._launchers import SSHWorkers, SlurmWorkers  # noqa: E402

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
