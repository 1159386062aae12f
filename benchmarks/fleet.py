"""A simulated fleet: one process that speaks the worker protocol for many workers at once (the
handshake, heartbeats, credit, CurveZMQ on request), bound or dialling in, and answers each task after
a set time without running it. What one client can feed is the ceiling of the whole product; this
measures it past what real worker processes on one machine allow.

    python -m benchmarks.fleet serve --workers 1000 --slots 16 --task-ms 1 [--dial ADDRESS] [--curve DIR]

prints one JSON line (the endpoints it bound, or the ones it dialled) once every socket is open, serves
until its standard input closes, then prints one JSON line of its own costs (CPU seconds, tasks
answered). ``python -m benchmarks.fleet run`` drives the matrix of the "Scaling" section: each
measurement in a fresh client process against a fresh fleet.

Per task the fleet does no more than a worker's supervisor does (split the batch, queue, answer with a
result pickled once), so its own CPU per task, reported beside the client's, shows whether it or the
client is the limit. Like a relaying worker it tells the client how long its tasks take (PACE), once:
a real worker's measure is the same, plus the microseconds of its local hop.
"""

from __future__ import annotations

import argparse
import heapq
import json
import selectors
import os
import socket
import subprocess
import sys
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Optional

import zmq
import zmq.auth

from zmqexecutor._wire import _protocol as proto
from zmqexecutor._wire._protocol import Kind
from zmqexecutor._wire._sockets import allow_descriptors_for, drain, fileno, roomy_context

# What a task answers: None, pickled once.
_RESULT = proto.encode_result(None)


class SimulatedWorker:
    """One worker of the fleet: a socket, its slots, the tasks waiting for one."""

    __slots__ = ("socket", "peer", "slots", "running", "waiting", "instance", "sent", "join", "paced")

    def __init__(self, sock: zmq.Socket[Any], slots: int, join: Optional[list[bytes]]) -> None:
        self.socket = sock
        self.peer: Optional[bytes] = None  # bound: the client's routing id, learnt from its HELLO
        self.slots = slots
        self.running = 0
        self.waiting: deque[int] = deque()
        self.instance = uuid.uuid4().hex
        self.sent = False
        self.join = join
        self.paced = False  # told its client how long its tasks take (PACE), as a relaying worker does

    def send(self, frames: list[Any]) -> None:
        if self.peer is not None:
            frames = [self.peer, *frames]
        self.socket.send_multipart(frames, zmq.NOBLOCK, copy=False)
        self.sent = True


class Fleet:
    def __init__(self, workers: int, slots: int, task_seconds: float, dial: Optional[str],
                 curve: Optional[Path]) -> None:
        allow_descriptors_for(workers)
        self.context = roomy_context()
        self.task_seconds = task_seconds
        self.info = dict(slots=slots, host=socket.gethostname(), pid=os.getpid(), keep_bytes=0,
                         max_message_size=proto.DEFAULT_MAX_MESSAGE_SIZE)
        self.workers: list[SimulatedWorker] = []
        self.endpoints: list[str] = []
        self.finishing: list[tuple[float, int, int]] = []  # (when, worker index, task id)
        self.answered = 0
        keys = _curve_keys(curve) if curve is not None else None
        for _ in range(workers):
            if dial is None:
                sock = self.context.socket(zmq.ROUTER)
                sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
                if keys is not None:
                    sock.curve_server = True
                    sock.curve_publickey, sock.curve_secretkey = keys["worker"]
                sock.bind("tcp://127.0.0.1:*")
                self.endpoints.append(sock.getsockopt_string(zmq.LAST_ENDPOINT))
                self.workers.append(SimulatedWorker(sock, slots, None))
            else:
                sock = self.context.socket(zmq.DEALER)
                worker = SimulatedWorker(sock, slots, None)
                sock.setsockopt(zmq.ROUTING_ID, worker.instance.encode())
                if keys is not None:
                    sock.curve_publickey, sock.curve_secretkey = keys["worker"]
                    sock.curve_serverkey = keys["client"][0]
                sock.connect(dial)
                # The client names a dialled-in worker by host and pid: each simulated one needs its own.
                worker.join = proto.encode_join(dict(instance=worker.instance, host=self.info["host"],
                                                     pid=os.getpid() * 10_000 + len(self.workers), slots=slots))
                worker.send(worker.join)  # queued until the connection is up
                self.workers.append(worker)
        # The sockets' descriptors in an epoll set: a wake costs what is ready, not the whole fleet (a
        # zmq.Poller over a thousand sockets cost the fleet more per task than the client spends).
        self.selector = selectors.DefaultSelector()
        for index, worker in enumerate(self.workers):
            self.selector.register(fileno(worker.socket), selectors.EVENT_READ, index)

    def serve(self, stdin_fd: int) -> None:
        self.selector.register(stdin_fd, selectors.EVENT_READ, -1)
        sent_to: set[int] = set(range(len(self.workers)))  # to look at again: a send may take in a signal
        while True:
            timeout = 0.0 if sent_to else None
            if not sent_to and self.finishing:
                timeout = max(0.0, self.finishing[0][0] - time.monotonic())
            candidates = sent_to
            sent_to = set()
            for key, _ in self.selector.select(timeout):
                if key.data == -1:
                    if not os.read(stdin_fd, 4096):
                        return
                    continue
                candidates.add(key.data)
            done: dict[int, list[proto.Item]] = {}
            for index in candidates:
                for frames in drain(self.workers[index].socket, 1_000_000):
                    self.handle(index, frames, done)
            now = time.monotonic()
            while self.finishing and self.finishing[0][0] <= now:
                _, index, ident = heapq.heappop(self.finishing)
                done.setdefault(index, []).append(proto.Item(Kind.RESULT, ident, _RESULT))
                self.workers[index].running -= 1
                self.start_waiting(index, now, done)
            for index, items in done.items():
                self.answered += sum(item.kind == Kind.RESULT for item in items)
                if not self.workers[index].paced:
                    self.workers[index].paced = True
                    items.append(proto.Item(Kind.PACE, round(self.task_seconds * 1e6), []))
                for start in range(0, len(items), 1000):
                    self.workers[index].send(proto.encode_messages(items[start:start + 1000]))
            sent_to = {index for index in candidates | set(done) if self.workers[index].sent}
            for index in sent_to:
                self.workers[index].sent = False

    def handle(self, index: int, frames: list[Any], done: dict[int, list[proto.Item]]) -> None:
        worker = self.workers[index]
        if worker.join is None:  # bound: the first frame is the client's routing id
            worker.peer, frames = frames[0].bytes, frames[1:]
        header = proto.decode_header(frames[0].bytes, any_version=True)
        if header.kind == Kind.HELLO:
            welcome, _, _ = proto.answer_hello(header, frames, dict(self.info, instance=worker.instance))
            worker.send(welcome)
        elif header.kind == Kind.PING:
            worker.send(proto.encode_bare(Kind.PONG))
        elif header.kind in (Kind.TASK, Kind.BATCH):
            now = time.monotonic()
            for item in proto.split(header, frames):
                if self.task_seconds <= 0:
                    done.setdefault(index, []).append(proto.Item(Kind.RESULT, item.ident, _RESULT))
                else:
                    worker.waiting.append(item.ident)
            self.start_waiting(index, now, done)

    def start_waiting(self, index: int, now: float, done: dict[int, list[proto.Item]]) -> None:
        worker = self.workers[index]
        while worker.waiting and worker.running < worker.slots:
            worker.running += 1
            heapq.heappush(self.finishing, (now + self.task_seconds, index, worker.waiting.popleft()))

    def close(self) -> None:
        for worker in self.workers:
            worker.socket.close(linger=0)
        self.context.term()


def _curve_keys(folder: Path) -> dict[str, tuple[bytes, bytes]]:
    keys = {}
    for role in ("worker", "client"):
        public, secret = zmq.auth.load_certificate(folder / role / f"{role}.key_secret")
        assert secret is not None
        keys[role] = (public, secret)
    return keys


def serve_main(args: argparse.Namespace) -> None:
    fleet = Fleet(args.workers, args.slots, args.task_ms / 1000, args.dial, args.curve)
    print(json.dumps({"endpoints": fleet.endpoints}), flush=True)
    cpu = time.process_time()
    try:
        fleet.serve(sys.stdin.fileno())
    finally:
        print(json.dumps({"cpu": time.process_time() - cpu, "answered": fleet.answered}), flush=True)
        fleet.close()


# --- the client side ------------------------------------------------------------------------------------


def noop(x: int) -> None:
    return None


class Running:
    """A fleet subprocess, stopped (its standard input closed) on exit, with its own report."""

    def __init__(self, workers: int, slots: int, task_ms: float, dial: Optional[str] = None,
                 curve: Optional[Path] = None) -> None:
        command = [sys.executable, "-m", "benchmarks.fleet", "serve", "--workers", str(workers), "--slots",
                   str(slots), "--task-ms", str(task_ms)]
        if dial is not None:
            command += ["--dial", dial]
        if curve is not None:
            command += ["--curve", str(curve)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        self.endpoints: list[str] = json.loads(self.process.stdout.readline())["endpoints"]
        self.report: dict[str, Any] = {}

    def __enter__(self) -> "Running":
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.close()
        line = self.process.stdout.readline()
        self.report = json.loads(line) if line else {}
        self.process.wait(60)


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(workers: int, slots: int, task_ms: float, tasks: int, dial: bool, curve: Optional[Path],
            idle_seconds: float) -> dict[str, Any]:
    """One client against one fleet: connect, first result, a burst of ``tasks``, then idle."""
    from zmqexecutor import ZMQExecutor

    allow_descriptors_for(workers)
    keys: dict[str, Any] = {"insecure": True} if curve is None else {"keys": curve / "client"}
    rss_before = _rss()
    listen = f"tcp://127.0.0.1:{_free_port()}" if dial else None
    started = time.perf_counter()
    cpu_started = time.process_time()
    if dial:
        ex = ZMQExecutor(listen=listen, connect_timeout=120, **keys)
        fleet = Running(workers, slots, task_ms, dial=listen, curve=curve)
    else:
        fleet = Running(workers, slots, task_ms, curve=curve)
        started = time.perf_counter()
        cpu_started = time.process_time()
        ex = ZMQExecutor(fleet.endpoints, connect_timeout=120, **keys)
    with fleet, ex:
        ex.wait_for_workers(workers, timeout=300)
        connected = time.perf_counter() - started
        ex.submit(noop, 0).result()
        first = time.perf_counter() - started
        connect_cpu = time.process_time() - cpu_started
        rss_connected = _rss()
        cpu = time.process_time()
        began = time.perf_counter()
        list(ex.map(noop, range(tasks)))
        elapsed = time.perf_counter() - began
        burst_cpu = time.process_time() - cpu
        time.sleep(1.0)  # the last replies' heartbeats settle
        cpu = time.process_time()
        time.sleep(idle_seconds)
        idle_cpu = time.process_time() - cpu
    answered = fleet.report.get("answered", 0)
    return {
        "workers": workers, "slots": slots, "task_ms": task_ms, "dial": dial, "curve": curve is not None,
        "connected_s": connected, "first_result_s": first, "connect_cpu_s": connect_cpu,
        "client_us_per_task": burst_cpu / tasks * 1e6, "tasks_per_s": tasks / elapsed,
        "fleet_us_per_task": fleet.report.get("cpu", 0.0) / max(1, answered) * 1e6, "fleet_answered": answered,
        "idle_core_percent": idle_cpu / idle_seconds * 100,
        "client_kib_per_worker": (rss_connected - rss_before) / workers / 1024,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def measure_main(args: argparse.Namespace) -> None:
    result = measure(args.workers, args.slots, args.task_ms, args.tasks, args.dial, args.curve, args.idle)
    print(json.dumps(result), flush=True)


# The matrix: fleet sizes, slots per worker, task lengths (ms).
FLEET_SIZES = (1, 10, 100, 1000)
SLOTS = (1, 16)
TASK_MS = (0.0, 1.0, 10.0)
# A burst is this many tasks per slot, within these bounds, and at most about BURST_SECONDS of work.
TASKS_PER_SLOT = 20
TASKS_AT_LEAST, TASKS_AT_MOST = 2_000, 50_000
BURST_SECONDS = 5.0


def burst_size(workers: int, slots: int, task_ms: float) -> int:
    tasks = min(TASKS_AT_MOST, max(TASKS_AT_LEAST, TASKS_PER_SLOT * workers * slots))
    if task_ms > 0:
        tasks = min(tasks, int(BURST_SECONDS * workers * slots * 1000 / task_ms))
    return tasks


def configurations(quick: bool) -> list[dict[str, Any]]:
    sizes = (1, 10, 100) if quick else FLEET_SIZES
    found = [dict(workers=w, slots=s, task_ms=t, dial=False, curve=False)
             for w in sizes for s in SLOTS for t in TASK_MS]
    found += [dict(workers=w, slots=1, task_ms=0.0, dial=True, curve=False) for w in sizes]
    found += [dict(workers=sizes[-1], slots=1, task_ms=0.0, dial=dial, curve=True) for dial in (False, True)]
    return found


def run_main(args: argparse.Namespace) -> None:
    """Every configuration, ``repeats`` times, interleaved, each in a fresh client process; medians."""
    import statistics
    import tempfile

    from .report import machine

    keys = Path(tempfile.mkdtemp(prefix="fleet-keys-")) / "keys"
    subprocess.run([sys.executable, "-m", "zmqexecutor", "keygen", str(keys)], check=True, capture_output=True)
    runs: dict[str, list[dict[str, Any]]] = {}
    for round_ in range(args.repeats):
        for config in configurations(args.quick):
            command = [sys.executable, "-m", "benchmarks.fleet", "measure", "--workers", str(config["workers"]),
                       "--slots", str(config["slots"]), "--task-ms", str(config["task_ms"]), "--idle", str(args.idle),
                       "--tasks", str(burst_size(config["workers"], config["slots"], config["task_ms"]))]
            command += ["--dial"] if config["dial"] else []
            command += ["--curve", str(keys)] if config["curve"] else []
            done = subprocess.run(command, capture_output=True, text=True, timeout=600)
            name = json.dumps(config, sort_keys=True)
            if done.returncode != 0:
                print(f"round {round_ + 1}: {name} failed: {done.stderr[-2000:]}", file=sys.stderr)
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            runs.setdefault(name, []).append(result)
            print(f"round {round_ + 1}: {_line(result)}", file=sys.stderr, flush=True)
    medians = []
    for name, results in runs.items():
        median = {key: statistics.median(r[key] for r in results) if isinstance(results[0][key], float) else
                  results[0][key] for key in results[0]}
        median["runs"] = len(results)
        medians.append(median)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fleet.json").write_text(json.dumps({"machine": machine(), "medians": medians}, indent=1))
    (out / "fleet.md").write_text(_table(medians, machine()))
    _plot(medians, out / "fleet.png")
    print((out / "fleet.md").read_text())


def _line(r: dict[str, Any]) -> str:
    return (f"{r['workers']:>5} x {r['slots']:>2} slots, {r['task_ms']:g} ms, {'dial' if r['dial'] else 'bound'}"
            f"{' curve' if r['curve'] else ''}: client {r['client_us_per_task']:.1f} us/task, "
            f"{r['tasks_per_s']:.0f} tasks/s, fleet {r['fleet_us_per_task']:.1f} us/task, connected in "
            f"{r['connected_s']:.2f} s, idle {r['idle_core_percent']:.2f}% of a core, "
            f"{r['client_kib_per_worker']:.0f} KiB/worker")


def _table(medians: list[dict[str, Any]], where: str) -> str:
    lines = [f"Simulated fleet ({where}); medians of {min(m['runs'] for m in medians)}+ runs, each in a fresh "
             "client process", "",
             "| workers | slots | task ms | how | client CPU us/task | tasks/s | fleet CPU us/task | connected s | "
             "first result s | idle % of a core | client KiB/worker |", "|" + "---:|" * 11]
    for m in sorted(medians, key=lambda m: (m["dial"], m["curve"], m["slots"], m["task_ms"], m["workers"])):
        how = ("dial-in" if m["dial"] else "bound") + (", CurveZMQ" if m["curve"] else "")
        lines.append(f"| {m['workers']} | {m['slots']} | {m['task_ms']:g} | {how} | {m['client_us_per_task']:.1f} | "
                     f"{m['tasks_per_s']:.0f} | {m['fleet_us_per_task']:.1f} | {m['connected_s']:.2f} | "
                     f"{m['first_result_s']:.2f} | {m['idle_core_percent']:.2f} | {m['client_kib_per_worker']:.0f} |")
    return "\n".join(lines) + "\n"


def _plot(medians: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for slots in SLOTS:
        for task_ms in TASK_MS:
            points = sorted((m["workers"], m["client_us_per_task"], m["tasks_per_s"]) for m in medians
                            if m["slots"] == slots and m["task_ms"] == task_ms and not m["dial"] and not m["curve"])
            if not points:
                continue
            label = f"{slots} slot{'s' if slots > 1 else ''}, {task_ms:g} ms tasks"
            axes[0].plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
            axes[1].plot([p[0] for p in points], [p[2] for p in points], marker="o", label=label)
    for axis, title in zip(axes, ("client CPU per task (us)", "tasks per second")):
        axis.set_xscale("log")
        axis.set_xlabel("simulated workers (bound)")
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
    axes[0].axhline(25, color="grey", linestyle="--", linewidth=1)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fleet", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="be the fleet (started by 'measure')")
    one = commands.add_parser("measure", help="one client against one fleet, a JSON line")
    for command in (serve, one):
        command.add_argument("--workers", type=int, default=10)
        command.add_argument("--slots", type=int, default=1)
        command.add_argument("--task-ms", type=float, default=0.0)
        command.add_argument("--curve", type=Path, default=None, help="a 'zmqexecutor keygen' folder")
    serve.add_argument("--dial", default=None, metavar="ADDRESS")
    one.add_argument("--dial", action="store_true", help="the workers dial in (else the client connects)")
    one.add_argument("--tasks", type=int, default=5000)
    one.add_argument("--idle", type=float, default=3.0, help="seconds of idle fleet to measure")
    matrix = commands.add_parser("run", help="the whole matrix, a table and a plot")
    matrix.add_argument("--repeats", type=int, default=3)
    matrix.add_argument("--quick", action="store_true", help="up to 100 workers")
    matrix.add_argument("--idle", type=float, default=3.0)
    matrix.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    {"serve": serve_main, "measure": measure_main, "run": run_main}[args.command](args)


if __name__ == "__main__":
    main()
