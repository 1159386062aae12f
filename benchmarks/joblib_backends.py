"""joblib's backends side by side: its default (loky), zmqexecutor's, and dask's, on this machine.

    python -m benchmarks.joblib_backends [--repeats 5]

Two workloads: ``Parallel`` of 10,000 tiny calls (joblib's auto-batching against each backend's cost
per batch), and a scikit-learn ``GridSearchCV`` (8 candidates x 5 folds of a logistic regression on
2,000 x 20). Each measurement runs in a fresh process, the backends interleaved round by round; medians
of wall-clock seconds, with the measuring process's own CPU seconds beside them (the work itself runs
in worker processes for every backend).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

BACKENDS = ("loky", "zmqexecutor", "dask")
WORKLOADS = ("tiny-calls", "grid-search")
WORKERS = 2


def square(x: int) -> int:
    return x * x


def tiny_calls() -> None:
    from joblib import Parallel, delayed

    assert Parallel(n_jobs=-1)(delayed(square)(i) for i in range(10_000))[-1] == 9_999 ** 2


def grid_search() -> None:
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV

    X, y = make_classification(n_samples=2000, n_features=20, random_state=0)
    grid = {"C": [0.001, 0.01, 0.1, 1, 10, 100, 1000, 10000]}
    GridSearchCV(LogisticRegression(max_iter=1000), grid, cv=5, n_jobs=-1).fit(X, y)


def measure(backend: str, workload: str) -> dict[str, Any]:
    from joblib import parallel_config

    run: Callable[[], None] = {"tiny-calls": tiny_calls, "grid-search": grid_search}[workload]
    if backend == "loky":
        with parallel_config(backend="loky", n_jobs=WORKERS):
            run()  # the workers start (and import) here, as the other backends' do below
            return _time(run)
    if backend == "zmqexecutor":
        import zmqexecutor.joblib  # noqa: F401

        with parallel_config(backend="zmqexecutor", max_workers=WORKERS):
            run()
            return _time(run)
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster), parallel_config(backend="dask"):
        run()
        return _time(run)


def _time(run: Callable[[], None]) -> dict[str, Any]:
    cpu, started = time.process_time(), time.perf_counter()
    run()
    return {"seconds": time.perf_counter() - started, "cpu": time.process_time() - cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--one", nargs=2, metavar=("BACKEND", "WORKLOAD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one)))
        return
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for _ in range(args.repeats):
        for workload in WORKLOADS:
            for backend in BACKENDS:
                done = subprocess.run([sys.executable, "-m", "benchmarks.joblib_backends", "--one", backend, workload],
                                      capture_output=True, text=True, timeout=600)
                if done.returncode != 0:
                    print(f"{backend} {workload} failed: {done.stderr[-1500:]}", file=sys.stderr)
                    continue
                runs.setdefault((workload, backend), []).append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"| workload | backend | seconds (median of {args.repeats}) | vs loky | this process's CPU s |")
    print("|---|---|---:|---:|---:|")
    for workload in WORKLOADS:
        base = statistics.median(r["seconds"] for r in runs.get((workload, "loky"), [{"seconds": float("nan")}]))
        for backend in BACKENDS:
            found = runs.get((workload, backend))
            if not found:
                print(f"| {workload} | {backend} | failed | | |")
                continue
            seconds = statistics.median(r["seconds"] for r in found)
            cpu = statistics.median(r["cpu"] for r in found)
            print(f"| {workload} | {backend} | {seconds:.3f} | {seconds / base:.2f}x | {cpu:.3f} |")


if __name__ == "__main__":
    main()
