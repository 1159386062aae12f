"""Dial-in workers: how long until the first result with each launcher, and throughput dial-in vs bound.

    python -m benchmarks.launchers [--repeats 5] [--workers 4] [--tasks 5000] [--task-ms 0]
        [--ssh HOST [--ssh-option ARG]... --ssh-address tcp://HERE:0]
        [--slurm --slurm-address tcp://HERE:0]   (sbatch and friends from PATH, $SLURM_CONF)

*Time to first result*: from before the launcher starts (or the executor, for workers started here as
plain processes) to the first task's result, with ``--workers`` workers of one task process each:
bound (``worker --bind`` subprocesses, then ``ZMQExecutor(endpoints)``), dial-in subprocesses
(``worker --connect``), ``SSHWorkers`` and ``SlurmWorkers`` when their host or cluster is given.

*Throughput*: tasks per second and client CPU per task over ``--workers`` workers, bound vs dialled
in, interleaved across rounds, each round in a fresh process. Medians. The tasks are no-ops, or sleep
``--task-ms`` (the client's cost of keeping real workers busy: ``--workers 40 --task-ms 2``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

from benchmarks.systems import _env, _free_ports

ROUNDS_SYSTEMS = ("bound", "dial-in")


def noop() -> None:
    return None


def _processes(mode: str, addresses: list[str]) -> list[subprocess.Popen[bytes]]:
    """One single-process worker per address: bound there (``--bind``) or dialling it (``--connect``)."""
    return [subprocess.Popen([sys.executable, "-m", "zmqexecutor", "worker", mode, address, "--processes", "1",
                              "--log-level", "ERROR"], stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
            for address in addresses]


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.send_signal(signal.SIGINT)
    for process in processes:
        process.wait()


def first_result(how: str, workers: int, args: argparse.Namespace) -> float:
    from zmqexecutor import SlurmWorkers, SSHWorkers, ZMQExecutor

    started = time.monotonic()
    if how == "bound":
        endpoints = [f"tcp://127.0.0.1:{port}" for port in _free_ports(workers)]
        processes = _processes("--bind", endpoints)
        try:
            with ZMQExecutor(endpoints) as ex:
                ex.submit(abs, 0).result()  # a builtin: the remote hosts need no benchmarks module
                return time.monotonic() - started
        finally:
            _stop(processes)
    if how == "dial-in":
        with ZMQExecutor(listen="tcp://127.0.0.1:0") as ex:
            assert ex.listen_address is not None
            processes = _processes("--connect", [ex.listen_address] * workers)
            try:
                ex.submit(abs, 0).result()  # a builtin: the remote hosts need no benchmarks module
                return time.monotonic() - started
            finally:
                _stop(processes)
    if how == "ssh":
        launcher: Any = SSHWorkers([args.ssh] * workers, address=args.ssh_address, ssh_options=args.ssh_option,
                                   python=sys.executable, processes=1)
    else:
        launcher = SlurmWorkers(nodes=workers, address=args.slurm_address, processes=1,
                                folder=args.slurm_folder)
    with launcher as w, ZMQExecutor(listen=w.address, keys=w.keys) as ex:
        ex.submit(abs, 0).result()
        return time.monotonic() - started


def throughput_round(how: str, workers: int, tasks: int, task_ms: float = 0.0) -> dict[str, float]:
    """One round, in this (fresh) process."""
    from zmqexecutor import ZMQExecutor

    if how == "bound":
        endpoints = [f"tcp://127.0.0.1:{port}" for port in _free_ports(workers)]
        processes = _processes("--bind", endpoints)
        ex = ZMQExecutor(endpoints)
    else:
        ex = ZMQExecutor(listen="tcp://127.0.0.1:0")
        assert ex.listen_address is not None
        processes = _processes("--connect", [ex.listen_address] * workers)
    try:
        ex.wait_for_workers(workers, timeout=60)
        for _ in range(200):  # warm: every task process has imported what it needs
            ex.submit(noop).result()
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        began = time.perf_counter()
        futures = [ex.submit(time.sleep, task_ms / 1000) if task_ms else ex.submit(noop) for _ in range(tasks)]
        for future in futures:
            future.result()
        elapsed = time.perf_counter() - began
        after = resource.getrusage(resource.RUSAGE_SELF)
        client_cpu = (after.ru_utime - cpu.ru_utime) + (after.ru_stime - cpu.ru_stime)
        return {"tasks_per_s": tasks / elapsed, "client_cpu_us": client_cpu / tasks * 1e6}
    finally:
        ex.shutdown()
        _stop(processes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--task-ms", type=float, default=0.0, help="tasks sleep this long (else no-ops)")
    parser.add_argument("--ssh", default=None, metavar="HOST")
    parser.add_argument("--ssh-option", action="append", default=[])
    parser.add_argument("--ssh-address", default=None)
    parser.add_argument("--slurm", action="store_true")
    parser.add_argument("--slurm-address", default=None)
    parser.add_argument("--slurm-folder", default=None)
    parser.add_argument("--round", default=None, help=argparse.SUPPRESS)  # one throughput round, for a child
    args = parser.parse_args(argv)
    if args.round:
        print(json.dumps(throughput_round(args.round, args.workers, args.tasks, args.task_ms)))
        return 0
    hows = ["bound", "dial-in"] + (["ssh"] if args.ssh else []) + (["slurm"] if args.slurm else [])
    firsts: dict[str, list[float]] = {how: [] for how in hows}
    rounds: dict[str, list[dict[str, float]]] = {how: [] for how in ROUNDS_SYSTEMS}
    for _ in range(args.repeats):
        for how in hows:  # interleaved
            firsts[how].append(first_result(how, args.workers, args))
        for how in ROUNDS_SYSTEMS:
            done = subprocess.run([sys.executable, "-m", "benchmarks.launchers", "--round", how, "--workers",
                                   str(args.workers), "--tasks", str(args.tasks), "--task-ms", str(args.task_ms)],
                                  capture_output=True, text=True,
                                  env=_env(), timeout=600, check=True)
            rounds[how].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"time to first result, {args.workers} workers of 1 process, median (min-max) of {args.repeats}:")
    for how, times in firsts.items():
        print(f"  {how:8s} {statistics.median(times):6.2f} s  ({min(times):.2f}-{max(times):.2f})")
    what = f"{args.task_ms:g} ms" if args.task_ms else "no-op"
    print(f"{what} throughput over {args.workers} workers, {args.tasks} tasks, median of {args.repeats}:")
    for how, results in rounds.items():
        rate = statistics.median(r["tasks_per_s"] for r in results)
        cpu = statistics.median(r["client_cpu_us"] for r in results)
        print(f"  {how:8s} {rate:8.0f} tasks/s   client CPU {cpu:5.1f} us/task")
    bound = statistics.median(r["tasks_per_s"] for r in rounds["bound"])
    dialled = statistics.median(r["tasks_per_s"] for r in rounds["dial-in"])
    print(f"  dial-in / bound: {dialled / bound:.2f}x")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
