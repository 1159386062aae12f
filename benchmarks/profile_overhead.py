"""Where the per-task cost goes: CPU time per no-op task in each process, embedded or over TCP.

    python -m benchmarks.profile_overhead [--system zmq-ipc|zmq-tcp] [--tasks 20000] [--rounds 3]

Reads utime+stime from /proc (Linux) for the client (and each of its threads), the worker's supervisor
and its task processes around bursts of no-op tasks, and prints the CPU microseconds each spends per
task, and how much of the machine sat idle meanwhile. On a machine with C cores, throughput cannot
exceed C / (total CPU per task). Single runs are noisy here: compare systems or commits round by round.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from concurrent.futures import wait

from benchmarks.systems import open_system
from benchmarks.workloads import noop, warm_up

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def idle_seconds() -> float:
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return (int(fields[4]) + int(fields[5])) / _TICK  # idle + iowait, all CPUs


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def thread_names(pid: int) -> dict[int, str]:
    """This process's threads: Python's names for its own, the kernel's for libzmq's."""
    python = {thread.native_id: thread.name for thread in threading.enumerate()}
    names = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            names[int(tid)] = python.get(int(tid)) or f.read().strip()
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--system", choices=("zmq-ipc", "zmq-tcp"), default="zmq-ipc",
                        help="the embedded workers (default), or a worker over loopback TCP")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with open_system(args.system, 2) as ex:
        warm_up(ex)
        supervisor = ex.workers()[0].pid  # type: ignore[attr-defined]  # a ZMQExecutor
        assert supervisor is not None
        pids = {"client": os.getpid(), "supervisor": supervisor}
        pids.update({f"task process {i}": p for i, p in enumerate(children(supervisor))})
        threads = thread_names(os.getpid())
        for _ in range(args.rounds):
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            before_threads = {tid: cpu_seconds(os.getpid(), tid) for tid in threads}
            idle_before, started = idle_seconds(), time.perf_counter()
            wait([ex.submit(noop) for _ in range(args.tasks)])
            elapsed = time.perf_counter() - started
            idle = idle_seconds() - idle_before
            after = {name: cpu_seconds(pid) for name, pid in pids.items()}
            after_threads = {tid: cpu_seconds(os.getpid(), tid) for tid in threads}
            per_task = {name: (after[name] - before[name]) / args.tasks * 1e6 for name in pids}
            print(f"{args.system}: {args.tasks} no-op tasks in {elapsed:.2f} s: {args.tasks / elapsed:.0f} tasks/s "
                  f"on {os.cpu_count()} CPUs, {idle / elapsed:.0%} of one CPU idle")
            for name, value in per_task.items():
                print(f"  {name:<16}{value:8.1f} us CPU per task")
                if name == "client":
                    for tid, thread in threads.items():
                        spent = (after_threads[tid] - before_threads[tid]) / args.tasks * 1e6
                        if spent >= 0.5:
                            print(f"    {thread:<18}{spent:6.1f}")
            total = sum(per_task.values())
            print(f"  {'total':<16}{total:8.1f} us CPU per task -> at most "
                  f"{(os.cpu_count() or 1) / total * 1e6:.0f} tasks/s")


if __name__ == "__main__":
    main()
