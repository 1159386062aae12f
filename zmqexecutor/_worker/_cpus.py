"""How many task processes a worker runs by default: the CPUs it may use.

Runs in the supervisor, and the client's constructor (the embedded default's count).
"""

from __future__ import annotations

import math
import os
from typing import Optional

from .._wire import _features
from .._wire._cgroups import CGROUP_ROOT, own_groups


def available_cpus() -> int:
    """The CPUs this process may use: its CPU affinity, capped by any CPU quota on its cgroup.

    A container started with ``--cpus 2`` on a 64-core host should run 2 task processes, not 64: more
    would only time-slice the quota (loky's ``cpu_count`` reasons the same way).
    """
    try:
        count = len(os.sched_getaffinity(0)) if _features.AFFINITY else os.cpu_count() or 1
    except OSError:
        count = os.cpu_count() or 1
    quota = _cgroup_cpu_quota() if _features.PROC else None
    return max(1, min(count, quota)) if quota is not None else count


def _cgroup_cpu_quota() -> Optional[int]:
    quotas = []
    for controllers, path in own_groups():
        if controllers == "":  # cgroup v2: "QUOTA PERIOD", or "max PERIOD" for none, in cpu.max
            for folder in _ancestors(CGROUP_ROOT, path):
                fields = _read(os.path.join(folder, "cpu.max")).split()
                quotas.append(_cpus(*fields) if len(fields) == 2 else None)
        elif "cpu" in controllers.split(","):  # cgroup v1: a quota of -1 means none
            mount = os.path.join(CGROUP_ROOT, controllers)
            for folder in _ancestors(mount if os.path.isdir(mount) else os.path.join(CGROUP_ROOT, "cpu"), path):
                quotas.append(_cpus(_read(os.path.join(folder, "cpu.cfs_quota_us")),
                                    _read(os.path.join(folder, "cpu.cfs_period_us"))))
    found = [q for q in quotas if q is not None]
    return math.ceil(min(found)) if found else None


def _cpus(quota: str, period: str) -> Optional[float]:
    # Anything but two positive integers ("max", "-1", an unreadable file) is no quota.
    if quota.isdigit() and period.isdigit() and int(quota) > 0 and int(period) > 0:
        return int(quota) / int(period)
    return None


def _ancestors(mount: str, path: str) -> list[str]:
    parts = [p for p in path.split("/") if p]
    return [os.path.join(mount, *parts[:depth]) for depth in range(len(parts), -1, -1)]


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except (OSError, ValueError):
        return ""
