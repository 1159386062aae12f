"""One copy per host: the memory a worker and its task processes use for an array every task needs.

    python -m benchmarks.kept_memory [--processes 4] [--mib 64] [--repeats 3]

A fresh worker on loopback TCP with ``--processes`` task processes gets a map whose callable holds
the same array (another fresh one: a map whose every task gets it as an argument); every task reads
all of it, and naps long enough that every process gets tasks (``NAP_SECONDS``). After the map, with the client still
connected, the resident (RSS) and proportional (PSS: shared pages divided among the processes that
map them) memory of the supervisor and its task processes are summed from /proc/PID/smaps_rollup.
Kept (the default) against ``--cache-size 0`` (nothing kept: each task process gets its own copy),
alternately in the same run; medians.
"""

from __future__ import annotations

import argparse
import functools
import signal
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.systems import start_worker
from zmqexecutor import ZMQExecutor

TASKS_PER_PROCESS = 2
# Longer than a copy of the array takes to reach a process, so that every process gets tasks even
# when each task brings its own copy (with shorter tasks one process keeps up with the transfers).
NAP_SECONDS = 0.5


def total(array: Any, x: int) -> float:
    time.sleep(NAP_SECONDS)
    return float(array.sum()) + x


def _memory(pid: int) -> tuple[int, int]:
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        values[name] = int(rest.split()[0]) * 1024
    return values["Rss"], values["Pss"]


def _family(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *(int(child) for child in children)]


def measure(processes: int, mib: int, keep: bool, form: str) -> tuple[float, float]:
    worker, endpoint = start_worker(processes, [] if keep else ["--cache-size", "0"])
    array = np.ones(mib * 1024 * 1024 // 8)
    tasks = processes * TASKS_PER_PROCESS
    try:
        with ZMQExecutor(endpoint) as ex:
            if form == "callable":
                results = list(ex.map(functools.partial(total, array), range(tasks)))
            else:
                results = list(ex.map(total, [array] * tasks, range(tasks)))
            assert results == [float(array.size) + x for x in range(tasks)]
            rss = pss = 0
            for pid in _family(worker.pid):
                one_rss, one_pss = _memory(pid)
                rss, pss = rss + one_rss, pss + one_pss
    finally:
        worker.send_signal(signal.SIGINT)
        worker.wait()
    return rss / 2**20, pss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    runs: dict[tuple[str, bool], list[tuple[float, float]]] = {}
    for _ in range(args.repeats):
        for form in ("callable", "argument"):
            for keep in (True, False):
                runs.setdefault((form, keep), []).append(measure(args.processes, args.mib, keep, form))
    print(f"{args.processes} task processes, a {args.mib} MiB array, MiB summed over the worker's processes "
          f"(medians of {args.repeats}):")
    for form in ("callable", "argument"):
        for index, name in enumerate(("RSS", "PSS")):
            kept = statistics.median(run[index] for run in runs[(form, True)])
            copied = statistics.median(run[index] for run in runs[(form, False)])
            print(f"  {form:8} {name}  kept in one memfd {kept:6.0f}   a copy per process {copied:6.0f}")


if __name__ == "__main__":
    main()
