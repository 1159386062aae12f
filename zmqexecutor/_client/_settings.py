"""What the executor configured, for its engine: read by the I/O thread and by the connections it
makes; never changed after the executor's constructor made it.
"""

from __future__ import annotations

import os
import socket
from typing import Optional

from .._wire import _protocol as proto
from .._wire._curve import ClientKeys, ListenKeys

# Heartbeats sent per worker_timeout: enough that a few lost or late ones never look like a dead worker.
HEARTBEATS_PER_TIMEOUT = 4


class Settings:
    """What the executor configured, for the engine."""

    def __init__(self, *, init_blob: bytes, max_tasks_per_child: Optional[int], max_in_flight: Optional[int],
                 connect_timeout: Optional[float], worker_timeout: float, max_retries: int,
                 max_message_size: int, keys: Optional[ClientKeys], task_output: str = "print",
                 listen: Optional[str] = None, listen_keys: Optional[ListenKeys] = None) -> None:
        self.init_blob = init_blob
        self.max_tasks_per_child = max_tasks_per_child
        self.max_in_flight = max_in_flight
        self.connect_timeout = connect_timeout
        self.worker_timeout = worker_timeout
        self.heartbeat = worker_timeout / HEARTBEATS_PER_TIMEOUT
        self.max_retries = max_retries
        self.max_message_size = max_message_size
        self.keys = keys
        self.task_output = task_output
        self.listen = listen
        self.listen_keys = listen_keys

    def hello(self) -> list[bytes]:
        info = dict(proto.local_versions(), host=socket.gethostname(), pid=os.getpid(),
                    max_tasks_per_child=self.max_tasks_per_child, timeout=self.worker_timeout,
                    max_message_size=self.max_message_size)
        return proto.encode_hello(info, self.init_blob)
