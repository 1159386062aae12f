"""Where the per-task cost goes: CPU time per no-op task in each process, embedded or over TCP.

    python -m benchmarks.profile_overhead [--system zmq-ipc|zmq-tcp|process] [--lone] [--tasks 20000] [--rounds 3]

Reads utime+stime from /proc (Linux) for the client (and each of its threads), the worker's supervisor
and its task processes (ProcessPoolExecutor's worker processes, with ``process``) around bursts of
no-op tasks, and prints the CPU microseconds each spends per task, and how much of the machine sat
idle meanwhile. On a machine with C cores, throughput cannot exceed C / (total CPU per task).

With ``--lone`` the tasks go one at a time (each waited for, as the latency workload does): then what
each thread and process spends is mostly what it costs to fall asleep and be woken, which is what a
lone task's round trip is made of. Single runs are noisy here: compare systems or commits round by round.
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
    parser.add_argument("--system", choices=("zmq-ipc", "zmq-tcp", "process"), default="zmq-ipc",
                        help="the embedded workers (default), a worker over loopback TCP, or "
                             "ProcessPoolExecutor to compare with")
    parser.add_argument("--lone", action="store_true", help="one task at a time, each waited for")
    parser.add_argument("--tasks", type=int, default=None, help="per round (default: 20000, --lone 3000)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tasks = args.tasks or (3000 if args.lone else 20_000)
    with open_system(args.system, 2) as ex:
        warm_up(ex)
        pids = {"client": os.getpid()}
        if args.system == "process":
            pids.update({f"worker {i}": p for i, p in enumerate(children(os.getpid()))})
        else:
            supervisor = ex.workers()[0].pid  # type: ignore[attr-defined]  # a ZMQExecutor
            assert supervisor is not None
            pids["supervisor"] = supervisor
            pids.update({f"task process {i}": p for i, p in enumerate(children(supervisor))})
        threads = thread_names(os.getpid())
        for _ in range(args.rounds):
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            before_threads = {tid: cpu_seconds(os.getpid(), tid) for tid in threads}
            idle_before, started = idle_seconds(), time.perf_counter()
            if args.lone:
                for _ in range(tasks):
                    ex.submit(noop).result()
            else:
                wait([ex.submit(noop) for _ in range(tasks)])
            elapsed = time.perf_counter() - started
            idle = idle_seconds() - idle_before
            after = {name: cpu_seconds(pid) for name, pid in pids.items()}
            after_threads = {tid: cpu_seconds(os.getpid(), tid) for tid in threads}
            per_task = {name: (after[name] - before[name]) / tasks * 1e6 for name in pids}
            pace = (f"{elapsed / tasks * 1e6:.0f} us per round trip" if args.lone
                    else f"{tasks / elapsed:.0f} tasks/s")
            print(f"{args.system}: {tasks} no-op tasks{' one at a time' if args.lone else ''} in {elapsed:.2f} s: "
                  f"{pace} on {os.cpu_count()} CPUs, {idle / elapsed:.0%} of one CPU idle")
            for name, value in per_task.items():
                print(f"  {name:<16}{value:8.1f} us CPU per task")
                if name == "client":
                    for tid, thread in threads.items():
                        spent = (after_threads[tid] - before_threads[tid]) / tasks * 1e6
                        if spent >= 0.5:
                            print(f"    {thread:<18}{spent:6.1f}")
            total = sum(per_task.values())
            bound = ("" if args.lone  # a round trip is bound by its wake-ups, not by the CPU
                     else f" -> at most {(os.cpu_count() or 1) / total * 1e6:.0f} tasks/s")
            print(f"  {'total':<16}{total:8.1f} us CPU per task{bound}")


if __name__ == "__main__":
    main()
