"""The worker's log as JSON lines (``zmqexecutor worker --log-format json``), for log collectors
(Loki, Elasticsearch, CloudWatch): one object per record, with the fields an operator filters on.

Runs in the process of the ``zmqexecutor`` command (the worker's supervisor), in its logging calls.
"""

from __future__ import annotations

import datetime
import json
import logging
import socket
from typing import Any

# Fields a record may carry (``logger.info(..., extra={"client": ...})``) that go into the line as
# they are.
_EXTRA_FIELDS = ("client", "task")


class JSONLines(logging.Formatter):
    """Each record as one JSON object: time (UTC, ISO 8601), level, logger, message, host, pid, the
    worker's endpoint, and the client and task id where the record names them."""

    def __init__(self, endpoint: str) -> None:
        super().__init__()
        self.endpoint = endpoint
        self.host = socket.gethostname()

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "host": self.host,
            "pid": record.process,
            "endpoint": self.endpoint,
        }
        for field in _EXTRA_FIELDS:
            value = record.__dict__.get(field)
            if value is not None:
                line[field] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(level: str, log_format: str, endpoint: str) -> None:
    """The worker's logging: to stderr, as text or JSON lines."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JSONLines(endpoint))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level))
