"""Sizes as people write them, how much memory a process holds, and whether the kernel's
out-of-memory killer took one: for the memory limits of task processes (``max_memory_per_child``,
``memory_limit``) and for saying why a task process died of SIGKILL.

Runs in user threads (an executor's options), in the ``zmqexecutor`` command (its options), in the
supervisor's loop thread (watching its task processes) and in task processes (their own size).
"""

from __future__ import annotations

import os
import re
import resource
import sys
from typing import Optional, Union

from ._cgroups import CGROUP_ROOT, own_groups

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "ki": 1024, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mi": 1024**2, "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gi": 1024**3, "gib": 1024**3,
          "t": 1000**4, "tb": 1000**4, "ti": 1024**4, "tib": 1024**4}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*")

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def parse_size(value: Union[int, str]) -> int:
    """A size as people write it: ``512MiB``, ``2GiB``, ``1.5G`` (10**9), ``100k``, or bytes (an int
    or digits). Raises ValueError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {value}")
        return value
    found = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if found is None or found.group(2).lower() not in _UNITS:
        raise ValueError(f"expected a size such as 512MiB, 2GiB, 1.5G or 1000000, got {value!r}")
    return int(float(found.group(1)) * _UNITS[found.group(2).lower()])


def format_size(size: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def resident_bytes(pid: Optional[int] = None) -> Optional[int]:
    """The resident memory of process ``pid`` (this one by default), or None where the system does
    not say. Without /proc (macOS) this process's own peak stands for it, and others' are unknown."""
    try:
        with open(f"/proc/{pid or 'self'}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        pass
    if pid is not None and pid != os.getpid():
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def watches_others() -> bool:
    """Whether ``resident_bytes`` knows other processes' sizes here (a memory limit needs it)."""
    return resident_bytes(os.getppid()) is not None


class OomKills:
    """How many processes the kernel's out-of-memory killer has taken in this process's control group
    (cgroup v2 ``memory.events``, or v1 ``memory.oom_control``), to tell its SIGKILL from another's."""

    def __init__(self) -> None:
        self.path = _oom_counter_path()

    def read(self) -> int:
        if self.path is None:
            return 0
        try:
            with open(self.path) as counters:
                for line in counters:
                    name, _, value = line.partition(" ")
                    if name == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            pass
        return 0


def _oom_counter_path() -> Optional[str]:
    candidates = []
    for controllers, path in own_groups():
        if controllers == "":
            root, name = CGROUP_ROOT, "memory.events"
        elif "memory" in controllers.split(","):
            root, name = f"{CGROUP_ROOT}/memory", "memory.oom_control"
        else:
            continue
        # In a container the hierarchy is mounted from the container's own group down, while the
        # path names it from the host's root: the longest tail of it that exists here is ours.
        parts = [part for part in path.split("/") if part]
        candidates += ["/".join([root, *parts[start:], name]) for start in range(len(parts) + 1)]
    return next((path for path in candidates if os.path.exists(path)), None)
