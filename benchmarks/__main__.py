"""Run the benchmark suite: ``python -m benchmarks [--quick] [--systems ...] [--workloads ...]``.

Each measurement runs in a fresh process, several times; the report (Markdown table, JSON, PNG plots
and the machine's description) goes to the results folder.
"""

from __future__ import annotations

import argparse
import compileall
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import report, workloads
from benchmarks.systems import SYSTEMS, process_env

DEFAULT_SYSTEMS = ["thread", "process", "loky", "dask", "zmq-ipc", "zmq-tcp", "zmq-curve", "pyzmq-floor", "ray", "mpi4py"]
BASIC_WORKLOADS = ["throughput", "main-function", "latency", "map", "payload", "payload-again", "cpu",
                   "heterogeneous", "startup", "memory", "send-once-argument", "send-once-partial",
                   "send-once-closure", "send-once-ideal"]
# Starting 64 workers of every peer on two cores takes minutes; scaling compares the pools that matter.
SCALING_SYSTEMS = {"process", "loky", "zmq-tcp"}
# Long sleep workloads: the pools that matter, and each of ours.
LONG_WORKLOADS = {"heterogeneous": {"process", "loky", "dask", "zmq-ipc", "zmq-tcp"},
                  "dispatch": {"process", "zmq-tcp"}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, one run each: a smoke test")
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                        help=f"comma-separated, from: {', '.join([*SYSTEMS, 'pyzmq-floor'])}")
    parser.add_argument("--workloads", default=None,
                        help=f"comma-separated, from: {', '.join(BASIC_WORKLOADS)}, scaling, dispatch")
    parser.add_argument("--repeats", type=int, default=None, help="runs per measurement (default 5; 1 with --quick)")
    parser.add_argument("--out", default="results", help="folder for the report (default: results)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one run may take")
    args = parser.parse_args(argv)

    systems = [s for s in args.systems.split(",") if s]
    unknown = [s for s in systems if s not in SYSTEMS and s != "pyzmq-floor"]
    if unknown:
        parser.error(f"unknown systems: {', '.join(unknown)}")
    chosen = args.workloads.split(",") if args.workloads else [*BASIC_WORKLOADS, "scaling", "dispatch"]
    names: list[str] = []
    for w in chosen:
        if w == "scaling":
            names += [f"scaling-{n}" for n in (workloads.SCALING_WORKERS_QUICK if args.quick else workloads.SCALING_WORKERS)]
        elif w == "dispatch":
            names += [f"dispatch-{n}" for n in (workloads.DISPATCH_WORKERS_QUICK if args.quick else workloads.DISPATCH_WORKERS)]
        elif w in BASIC_WORKLOADS:
            names.append(w)
        else:
            parser.error(f"unknown workload {w!r}")
    repeats = args.repeats or (1 if args.quick else 5)
    # Our modules compiled as pip's install compiles them, like the peers' in site-packages: where
    # PYTHONDONTWRITEBYTECODE is set, a source checkout would otherwise compile ours at every start-up.
    compileall.compile_dir(str(Path(__file__).resolve().parent.parent / "zmqexecutor"), quiet=1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # An earlier run's report in the same folder would otherwise pass for this run's until this one
    # ends, and its plots stay for good where this run makes none.
    for name in REPORT_FILES:
        (out / name).unlink(missing_ok=True)

    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    if args.quick and repeats == 1:
        _smoke(systems, names, args.timeout, results)
    for workload in names if not (args.quick and repeats == 1) else []:
        measured = [s for s in systems if _measures(s, workload)]
        # Rounds interleave the systems, each run in a fresh process: a slow spell of this shared
        # machine then hits every system alike instead of one system's runs.
        for _ in range(repeats):
            for system in measured:
                runs = results.setdefault(workload, {}).setdefault(system, [])
                if runs and "value" not in runs[-1]:
                    continue  # skipped or failed: once is enough
                run = _run(system, workload, args.quick, args.timeout)
                runs.append(run)
                status = run.get("skipped") or run.get("error") or f"{run['value']:.4g} {run['unit']}"
                print(f"{workload:<14} {system:<12} {status}", flush=True)

    command = "python -m benchmarks " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    (out / "results.json").write_text(json.dumps({"machine": report.machine(), "command": command,
                                                  "results": results}, indent=1))
    table = report.markdown(results, command.strip())
    (out / "results.md").write_text(table)
    (out / "summary.rst").write_text(report.rst_summary(results) + "\n")
    plots = report.plot(results, out)
    print(table)
    print(f"report: {out / 'results.md'}; plots: {', '.join(str(p) for p in plots) or 'none (no matplotlib)'}")
    return 0


REPORT_FILES = ("results.json", "results.md", "summary.rst", "workloads.png", "scaling.png")


def _measures(system: str, workload: str) -> bool:
    kind = workload.split("-", 1)[0]
    if workload.startswith("scaling-"):
        return system in SCALING_SYSTEMS
    if kind in LONG_WORKLOADS or workload in LONG_WORKLOADS:
        return system in LONG_WORKLOADS.get(kind, LONG_WORKLOADS.get(workload, set()))
    if system == "pyzmq-floor":
        return workload in ("payload", "payload-again")
    if system == "dask-scatter":  # dask itself, but for the send-once workloads
        return workload.startswith("send-once-") and workload != "send-once-ideal"
    return True


def _smoke(systems: list[str], names: list[str], timeout: float,
           results: dict[str, dict[str, list[dict[str, Any]]]]) -> None:
    """The --quick run: one process per system runs all its workloads (a pool shared where it can),
    a progress line per measurement, one note per system that is not installed."""
    plan = [(system, [w for w in names if _measures(system, w)]) for system in systems]
    total = sum(len(ws) for _, ws in plan)
    done = 0
    for system, chosen in plan:
        if not chosen:
            continue
        command = [sys.executable, "-m", "benchmarks.run_one", system, ",".join(chosen), "--quick", "--each"]
        started = time.monotonic()
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env=process_env(system)) as process:
            assert process.stdout is not None
            seen = set()
            last = started
            for line in process.stdout:
                took, last = time.monotonic() - last, time.monotonic()
                run = json.loads(line)
                workload = run.pop("workload")
                seen.add(workload)
                results.setdefault(workload, {}).setdefault(system, []).append(run)
                done += 1
                if "skipped" in run and all("skipped" in r for w in chosen if w in seen
                                            for r in results.get(w, {}).get(system, [])):
                    if len(seen) == 1:
                        print(f"[{done}/{total}] {system}: {run['skipped']}; skipped", flush=True)
                    continue
                status = run.get("error") or run.get("skipped") or f"{run['value']:.4g} {run['unit']}"
                print(f"[{done}/{total}] {workload:<14} {system:<12} {status}  ({took:.1f} s)", flush=True)
                if time.monotonic() - started > timeout:
                    process.kill()
        for workload in chosen:
            if workload not in seen:
                done += 1
                results.setdefault(workload, {}).setdefault(system, []).append({"error": "did not finish"})
                print(f"[{done}/{total}] {workload:<14} {system:<12} did not finish", flush=True)


def _run(system: str, workload: str, quick: bool, timeout: float) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.run_one", system, workload, *(["--quick"] if quick else [])]
    started = time.monotonic()
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=process_env(system))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        tail = out.stderr.strip().splitlines()[-1:] or [f"exit code {out.returncode}"]
        return {"error": f"failed after {time.monotonic() - started:.0f} s: {tail[0]}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


if __name__ == "__main__":
    sys.exit(main())
