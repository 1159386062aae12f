"""The worker's sessions: one per client that shook hands, with what it asked for.

Runs in the supervisor's loop thread.
"""

from __future__ import annotations

import time
from typing import Any, Iterator, Optional

from .._wire._protocol import DEFAULT_SILENCE_TIMEOUT

# A session is dropped when its client has been silent for this many of the client's own timeouts
# (the client sends heartbeats several times per timeout). Dropping a live client's session costs it
# a new handshake and retries, so this errs on the long side.
SESSION_TIMEOUT_FACTOR = 3


class Session:
    __slots__ = ("client", "init_blob", "max_tasks_per_child", "expiry", "last_seen", "max_message_size", "told_pace")

    def __init__(self, client: bytes, init_blob: bytes, info: dict[str, Any]) -> None:
        self.client = client
        self.init_blob = init_blob
        self.max_tasks_per_child: Optional[int] = info.get("max_tasks_per_child")
        self.expiry = SESSION_TIMEOUT_FACTOR * float(info.get("timeout") or DEFAULT_SILENCE_TIMEOUT)
        self.last_seen = time.monotonic()
        limit = info.get("max_message_size")
        self.max_message_size: Optional[int] = limit if isinstance(limit, int) and limit > 0 else None
        self.told_pace: Optional[float] = None  # the task duration it was last told (PACE), seconds


class Sessions:
    def __init__(self) -> None:
        self.by_client: dict[bytes, Session] = {}

    def __len__(self) -> int:
        return len(self.by_client)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self.by_client.values()))

    def get(self, client: bytes) -> Optional[Session]:
        return self.by_client.get(client)

    def open(self, client: bytes, init_blob: bytes, info: dict[str, Any]) -> Session:
        session = self.by_client[client] = Session(client, init_blob, info)
        return session

    def close(self, client: bytes) -> bool:
        return self.by_client.pop(client, None) is not None

    def expired(self, now: float) -> list[Session]:
        return [s for s in self.by_client.values() if now - s.last_seen > s.expiry]
