"""zmqexecutor: a ``concurrent.futures.Executor`` that runs Python functions on many machines over ZeroMQ."""

from __future__ import annotations

import logging

__version__ = "0.1.0"

from ._errors import (  # noqa: E402
    BrokenWorkerPool,
    NoWorkersError,
    RemoteError,
    RemoteTraceback,
    TaskCrashedError,
    VersionMismatchError,
    ZMQExecutorError,
)
from ._executor import DEFAULT_CONNECT_TIMEOUT, ZMQExecutor  # noqa: E402

__all__ = [
    "ZMQExecutor",
    "DEFAULT_CONNECT_TIMEOUT",
    "ZMQExecutorError",
    "RemoteError",
    "RemoteTraceback",
    "TaskCrashedError",
    "BrokenWorkerPool",
    "NoWorkersError",
    "VersionMismatchError",
    "__version__",
]

logging.getLogger("zmqexecutor").addHandler(logging.NullHandler())
