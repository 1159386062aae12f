"""How long the client takes to notice a lost worker, per kind of fault.

    python -m benchmarks.fault_detection [--repeats 5] [--worker-timeout 1.0]

For each fault it starts a real worker, connects an executor, injects the fault, and times how long
until the executor stops treating the worker as ready. Prints the median and range per fault.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import time

from benchmarks.systems import start_worker
from zmqexecutor import ZMQExecutor


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def measure(fault: str, worker_timeout: float) -> float:
    process, endpoint = start_worker(1, [])
    frozen: list[int] = []
    try:
        with ZMQExecutor(endpoint, worker_timeout=worker_timeout, connect_timeout=5) as ex:
            ex.submit(abs, 1).result(timeout=30)
            started = time.monotonic()
            if fault == "SIGKILL":
                process.kill()
            else:
                frozen = [process.pid, *_children(process.pid)]
                for pid in frozen:
                    os.kill(pid, signal.SIGSTOP)
            while ex.workers()[0].state == "ready":
                time.sleep(0.005)
            detected = time.monotonic() - started
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
            ex.shutdown(wait=False, cancel_futures=True)
        return detected
    finally:
        process.kill()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker-timeout", type=float, default=1.0)
    args = parser.parse_args()
    print(f"worker_timeout={args.worker_timeout:g} s, {args.repeats} runs each")
    print(f"{'fault':<10}{'median':>10}{'min':>10}{'max':>10}")
    for fault in ("SIGKILL", "SIGSTOP"):
        times = [measure(fault, args.worker_timeout) for _ in range(args.repeats)]
        print(f"{fault:<10}{statistics.median(times):>9.3f}s{min(times):>9.3f}s{max(times):>9.3f}s")


if __name__ == "__main__":
    main()
