"""What CurveZMQ costs: the round trip of a tiny task and a 64 MiB array in and out, plain vs encrypted.

    python -m benchmarks.encryption_cost [--repeats 5]

Both workers run on this machine over loopback TCP, one plain and one with keys; the two are measured
alternately in the same run, and the medians are compared.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.systems import start_worker
from zmqexecutor import ZMQExecutor


def echo(x: object) -> object:
    return x


def measure(ex: ZMQExecutor, array: np.ndarray, round_trips: int) -> tuple[float, float]:
    started = time.perf_counter()
    for _ in range(round_trips):
        ex.submit(echo, 1).result()
    rtt = (time.perf_counter() - started) / round_trips
    started = time.perf_counter()
    out = ex.submit(echo, array).result()
    transfer = time.perf_counter() - started
    assert out.nbytes == array.nbytes
    return rtt, transfer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--round-trips", type=int, default=300)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="zmqexecutor-bench-")
    keys = Path(folder) / "keys"
    subprocess.run([sys.executable, "-m", "zmqexecutor", "keygen", str(keys)], check=True, capture_output=True)
    plain, plain_endpoint = start_worker(1, [])
    secure, secure_endpoint = start_worker(1, ["--keys", str(keys / "worker")])
    array = np.ones(64 * 1024 * 1024 // 8)
    results: dict[str, list[tuple[float, float]]] = {"plain": [], "CurveZMQ": []}
    try:
        with ZMQExecutor(plain_endpoint) as a, ZMQExecutor(secure_endpoint, keys=keys / "client") as b:
            for ex in (a, b):
                measure(ex, array, 20)  # warm up
            for _ in range(args.repeats):
                results["plain"].append(measure(a, array, args.round_trips))
                results["CurveZMQ"].append(measure(b, array, args.round_trips))
    finally:
        for process in (plain, secure):
            process.terminate()
            process.wait()
        shutil.rmtree(folder, ignore_errors=True)  # the secret keys with it
    print(f"{args.repeats} runs, medians (min-max); loopback TCP, one task process")
    print(f"{'':<10}{'round trip':>26}{'64 MiB in + out':>28}")
    medians = {}
    for name, runs in results.items():
        rtts, transfers = [r for r, _ in runs], [t for _, t in runs]
        medians[name] = (statistics.median(rtts), statistics.median(transfers))
        print(f"{name:<10}{medians[name][0] * 1e6:>9.0f} us ({min(rtts) * 1e6:.0f}-{max(rtts) * 1e6:.0f})"
              f"{medians[name][1] * 1e3:>14.0f} ms ({min(transfers) * 1e3:.0f}-{max(transfers) * 1e3:.0f})")
    print(f"{'ratio':<10}{medians['CurveZMQ'][0] / medians['plain'][0]:>13.2f}x"
          f"{medians['CurveZMQ'][1] / medians['plain'][1]:>25.2f}x")


if __name__ == "__main__":
    main()
