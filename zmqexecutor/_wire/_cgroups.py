"""This process's control groups, as /proc/self/cgroup names them: where a worker reads its CPU quota
(_worker._cpus) and the kernel's out-of-memory kills (_memory).

Runs anywhere; it only reads files.
"""

from __future__ import annotations

CGROUP_ROOT = "/sys/fs/cgroup"


def own_groups() -> list[tuple[str, str]]:
    """(controllers, path) of each hierarchy this process is in: ``""`` for cgroup v2's unified one,
    ``"cpu,cpuacct"`` and the like for v1's. Empty where the system has no such file."""
    try:
        with open("/proc/self/cgroup") as groups:
            lines = groups.read().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) == 3:
            found.append((fields[1], fields[2]))
    return found
