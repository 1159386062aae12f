"""The executors compared, each opened the same way: ``with open_system(name, workers) as ex``.

A peer that is not installed raises ``Unavailable`` with the reason; the runner reports it and moves on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent


class Unavailable(Exception):
    """Raised when a system cannot be measured here (its package is not installed)."""


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def _free_ports(count: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def start_worker(processes: int, extra: list[str], endpoint: str | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """A zmqexecutor worker on loopback TCP; clients wait for its handshake, so no need to wait here."""
    endpoint = endpoint or f"tcp://127.0.0.1:{_free_ports(1)[0]}"
    process = subprocess.Popen(
        [sys.executable, "-m", "zmqexecutor", "worker", "--bind", endpoint,
         "--processes", str(processes), "--log-level", "ERROR", *extra],
        stdin=subprocess.DEVNULL, env=_env(),
    )
    return process, endpoint


@contextlib.contextmanager
def _workers(count: int, processes: int, extra: list[str]) -> Iterator[list[str]]:
    """``count`` zmqexecutor workers on loopback TCP, ``processes`` task processes each."""
    started = [start_worker(processes, extra, f"tcp://127.0.0.1:{port}") for port in _free_ports(count)]
    try:
        yield [endpoint for _, endpoint in started]
    finally:
        for process, _ in started:
            process.send_signal(signal.SIGINT)  # at once: SIGTERM would drain what a workload left running
        for process, _ in started:
            process.wait()


@contextlib.contextmanager
def _zmq_tcp(workers: int, slots_per_worker: int | None, secure: bool) -> Iterator[Executor]:
    from zmqexecutor import ZMQExecutor

    count, processes = (workers, 1) if slots_per_worker == 1 else (1, workers)
    # zmq-tcp measures plain TCP: without this, loopback would be secured by the user's key store.
    extra: list[str] = ["--insecure"]
    options: dict[str, Any] = {"insecure": True}
    with tempfile.TemporaryDirectory(prefix="zmqexecutor-bench-") as folder:
        if secure:
            keys = Path(folder) / "keys"
            subprocess.run([sys.executable, "-m", "zmqexecutor", "keygen", str(keys)], check=True,
                           capture_output=True, env=_env())
            extra = ["--keys", str(keys / "worker")]
            options = {"keys": keys / "client"}
        with _workers(count, processes, extra) as endpoints:
            with ZMQExecutor(endpoints, **options) as ex:
                yield ex


@contextlib.contextmanager
def _dask(workers: int) -> Iterator[Executor]:
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise Unavailable("dask.distributed is not installed (pip install '.[bench]')") from None
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            with client.get_executor(pure=False) as ex:
                yield ex


@contextlib.contextmanager
def _loky(workers: int) -> Iterator[Executor]:
    try:
        from loky import get_reusable_executor
    except ImportError:
        raise Unavailable("loky is not installed (pip install '.[bench]')") from None
    ex = get_reusable_executor(max_workers=workers, timeout=600)
    try:
        yield ex
    finally:
        ex.shutdown(wait=True, kill_workers=True)


class _RayExecutor(Executor):
    """Ray tasks behind the Executor API: ``ObjectRef.future()`` is a concurrent.futures.Future."""

    def __init__(self) -> None:
        self._remotes: dict[Any, Any] = {}

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        import ray

        remote = self._remotes.get(fn)
        if remote is None:
            remote = self._remotes[fn] = ray.remote(fn)
        return remote.remote(*args, **kwargs).future()


@contextlib.contextmanager
def _ray(workers: int) -> Iterator[Executor]:
    try:
        import ray
    except ImportError:
        raise Unavailable("ray is not installed") from None
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        yield _RayExecutor()
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _mpi4py(workers: int) -> Iterator[Executor]:
    try:
        from mpi4py.futures import MPIPoolExecutor
    except ImportError:
        raise Unavailable("mpi4py is not installed") from None
    with MPIPoolExecutor(max_workers=workers) as ex:
        yield ex


@contextlib.contextmanager
def _zmq_ipc(workers: int) -> Iterator[Executor]:
    from zmqexecutor import ZMQExecutor

    with ZMQExecutor(max_workers=workers) as ex:
        yield ex


SYSTEMS: dict[str, Callable[..., Any]] = {
    "thread": lambda workers, **_: ThreadPoolExecutor(workers),
    "process": lambda workers, **_: ProcessPoolExecutor(workers),
    "loky": lambda workers, **_: _loky(workers),
    "dask": lambda workers, **_: _dask(workers),
    # The same cluster; the send-once workloads scatter their array to every worker by hand first
    # (client.scatter(broadcast=True)), as a dask user who knows to would.
    "dask-scatter": lambda workers, **_: _dask(workers),
    "zmq-ipc": lambda workers, **_: _zmq_ipc(workers),
    "zmq-tcp": lambda workers, single_slot=False, **_: _zmq_tcp(workers, 1 if single_slot else None, False),
    "zmq-curve": lambda workers, single_slot=False, **_: _zmq_tcp(workers, 1 if single_slot else None, True),
    # Ours without the Linux-only calls, as on macOS: see process_env.
    "zmq-ipc-portable": lambda workers, **_: _zmq_ipc(workers),
    "zmq-tcp-portable": lambda workers, single_slot=False, **_: _zmq_tcp(workers, 1 if single_slot else None, False),
    "ray": lambda workers, **_: _ray(workers),
    "mpi4py": lambda workers, **_: _mpi4py(workers),
}


def process_env(system: str) -> dict[str, str] | None:
    """The environment a measurement of ``system`` runs in (None: this one). The portable systems run
    with tests/portable first on the path: every process they start then lacks the Linux-only calls."""
    if not system.endswith("-portable"):
        return None
    path = os.pathsep.join([str(ROOT / "tests" / "portable"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, ZMQEXECUTOR_PORTABLE="1")


def open_system(name: str, workers: int, *, single_slot: bool = False) -> contextlib.AbstractContextManager[Executor]:
    """An executor of the named system with ``workers`` workers (single-slot ones when asked)."""
    return SYSTEMS[name](workers, single_slot=single_slot)  # type: ignore[no-any-return]
