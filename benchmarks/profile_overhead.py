"""Where the per-task cost goes: CPU time per no-op task in each process of the embedded default.

    python -m benchmarks.profile_overhead [--tasks 10000]

Reads utime+stime from /proc (Linux) for the client, the worker's supervisor and its task processes
around a burst of no-op tasks, and prints the CPU microseconds each spends per task. On a machine with
C cores, throughput cannot exceed C / (total CPU per task).
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import wait

from zmqexecutor import ZMQExecutor

from benchmarks.workloads import noop, warm_up

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=10_000)
    args = parser.parse_args()
    with ZMQExecutor(max_workers=2) as ex:
        warm_up(ex)
        supervisor = ex.workers()[0].pid
        assert supervisor is not None
        pids = {"client": os.getpid(), "supervisor": supervisor}
        pids.update({f"task process {i}": p for i, p in enumerate(children(supervisor))})
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        started = time.perf_counter()
        wait([ex.submit(noop) for _ in range(args.tasks)])
        elapsed = time.perf_counter() - started
        after = {name: cpu_seconds(pid) for name, pid in pids.items()}
    total = 0.0
    print(f"{args.tasks} no-op tasks in {elapsed:.2f} s: {args.tasks / elapsed:.0f} tasks/s on {os.cpu_count()} CPUs")
    for name in pids:
        per_task = (after[name] - before[name]) / args.tasks * 1e6
        total += per_task
        print(f"  {name:<16}{per_task:8.0f} us CPU per task")
    print(f"  {'total':<16}{total:8.0f} us CPU per task -> at most {(os.cpu_count() or 1) / total * 1e6:.0f} tasks/s")


if __name__ == "__main__":
    main()
