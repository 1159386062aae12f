"""One measurement in a fresh process: ``python -m benchmarks.run_one SYSTEM WORKLOAD [--quick]``.

Prints one JSON object: the measurement, or ``{"skipped": reason}``. With several comma-separated
workloads (the ``--quick`` smoke run), it prints one line per workload as each ends, and those that
need nothing but a pool share one pool.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from benchmarks import systems, workloads


def measure(system: str, workload: str, quick: bool) -> dict[str, object]:
    if system == "pyzmq-floor":
        if workload not in ("payload", "payload-again"):
            return {"skipped": "the pyzmq floor is measured for the payload workloads only"}
        return workloads.payload_floor(quick, again=workload == "payload-again")
    if workload == "startup":
        started = time.perf_counter()
        with systems.open_system(system, workloads.WORKERS) as ex:
            ex.submit(workloads.noop).result()
            elapsed = time.perf_counter() - started
        return {"value": elapsed, "unit": "s to the first result", "better": "lower"}
    if workload.startswith(("scaling-", "dispatch-")):
        kind, count = workload.split("-", 1)
        with systems.open_system(system, int(count), single_slot=True) as ex:
            measure_one = workloads.scaling if kind == "scaling" else workloads.dispatch
            return measure_one(ex, quick, system, int(count))
    if workload == "main-function":
        # Defined before the pool starts, so that ProcessPoolExecutor's forked workers have it too.
        workloads.MAIN_NOOP = workloads.define_in_main()
    with systems.open_system(system, workloads.WORKERS) as ex:
        workloads.warm_up(ex)
        return workloads.WORKLOADS[workload](ex, quick, system)


def measure_many(system: str, names: list[str], quick: bool) -> None:
    """Each of ``names`` in turn, one JSON line each; those of the plain kind in one shared pool."""
    shared = [n for n in names if n in workloads.WORKLOADS and system != "pyzmq-floor"]
    for name in names:
        if name not in shared:
            _emit(name, lambda: measure(system, name, quick))
    if not shared:
        return
    if "main-function" in shared:
        workloads.MAIN_NOOP = workloads.define_in_main()
    try:
        with systems.open_system(system, workloads.WORKERS) as ex:
            workloads.warm_up(ex)
            for name in shared:
                _emit(name, lambda: workloads.WORKLOADS[name](ex, quick, system))
    except systems.Unavailable as exc:
        skipped = {"skipped": str(exc)}
        for name in shared:
            _emit(name, lambda: skipped)


def _emit(name: str, run: Any) -> None:
    try:
        result = run()
    except systems.Unavailable as exc:
        result = {"skipped": str(exc)}
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps({"workload": name, **result}) + "\n")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("system")
    parser.add_argument("workload")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--each", action="store_true", help="one line per workload, named (implied by a comma)")
    args = parser.parse_args()
    if args.each or "," in args.workload:
        measure_many(args.system, args.workload.split(","), args.quick)
        return
    try:
        result = measure(args.system, args.workload, args.quick)
    except systems.Unavailable as exc:
        result = {"skipped": str(exc)}
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
