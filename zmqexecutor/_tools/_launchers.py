"""Starting dial-in workers with tools users already run: SSH and Slurm. No scheduler of our own.

Runs in the user's program, in the thread that starts and stops a launcher.

Both launchers make the same promise: ``with Launcher(...) as w, ZMQExecutor(listen=w.address,
keys=w.keys) as ex`` starts workers that dial ``w.address``, secured with CurveZMQ keys made for this
run alone (or the ``keys`` folder given), and stops them when the block ends, even when the client
dies first (the SSH worker's standard input is its lifeline; a Slurm job's workers stop after
``idle_timeout`` without a client, and the job is cancelled on the way out).

The keys never appear on a command line: SSH sends the worker's on the connection's standard input;
Slurm jobs read them from a folder only the user can read (on a file system the nodes share).
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any, Mapping, Optional, Sequence, Union

from .._wire._endpoints import parse
from .._wire._errors import LaunchError
from .._wire._resources import check_amounts
from .._wire._curve import DialKeys
from .._wire._security import (
    keygen,
    keys_line,
    load_key_pair,
    load_public_key,
)

logger = logging.getLogger("zmqexecutor")

#: How long, by default, a launcher waits for its workers to start before it gives up.
DEFAULT_START_TIMEOUT = 60.0

#: A launched worker stops after this long without a client (a client that died without stopping it).
DEFAULT_IDLE_TIMEOUT = 300.0

# Lines of a failed worker's standard error (or job output) quoted in the error.
STDERR_TAIL_LINES = 20

# How long stopping waits for workers to end once told to, before it kills: told to stop, a worker
# drains (its running tasks may take up to its --drain-timeout, 30 s by default, to finish).
STOP_GRACE = 40.0

# How often a Slurm job's state is polled while it starts and stops: squeue is a call to slurmctld.
SLURM_POLL_INTERVAL = 0.5

PathLike = Union[str, "os.PathLike[str]"]


class _Launcher:
    def __init__(self, address: Optional[str], keys: Optional[PathLike], processes: Optional[int],
                 python: str, idle_timeout: Optional[float], start_timeout: float,
                 resources: Optional[Mapping[str, float]] = None) -> None:
        if processes is not None and (not isinstance(processes, int) or processes < 1):
            raise ValueError("processes must be a positive integer or None")
        self.resources = None if resources is None else check_amounts(resources, "resources")
        if not start_timeout > 0:
            raise ValueError("start_timeout must be > 0")
        self._given_address = address
        self._given_keys = None if keys is None else Path(keys).expanduser()
        self.processes = processes
        self.python = python
        self.idle_timeout = idle_timeout
        self.start_timeout = start_timeout
        self._folder: Optional[Path] = None  # our own keys for this run, removed at stop
        self.address = ""
        self.keys: Optional[Path] = None

    def __enter__(self) -> Any:
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def _prepare(self, near: Optional[str], parent: Optional[Path] = None) -> Path:
        """Fill in ``address`` and ``keys``, and make this run's private folder (``_folder``, which
        holds the keys made for this run); returns the worker key folder."""
        self.address = with_free_port(self._given_address) if self._given_address else default_address(near)
        if self._given_keys is not None and not (self._given_keys / "worker" / "worker.key_secret").exists():
            raise LaunchError(f"{self._given_keys} is not a folder made by 'zmqexecutor keygen' "
                              "(no worker/worker.key_secret in it)")
        if parent is not None:
            parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._folder = Path(tempfile.mkdtemp(prefix="zmqexecutor-run-", dir=parent))  # mode 0700
        root = self._given_keys
        if root is None:
            root = self._folder / "keys"
            keygen(root)
        self.keys = root / "client"
        return root / "worker"

    def _worker_command(self, *extra: str) -> list[str]:
        command = [self.python, "-m", "zmqexecutor", "worker", "--connect", self.address, *extra]
        if self.processes is not None:
            command += ["--processes", str(self.processes)]
        if self.idle_timeout is not None:
            command += ["--idle-timeout", f"{self.idle_timeout:g}"]
        if self.resources:
            command += ["--resources", ",".join(f"{name}={amount:g}" for name, amount in self.resources.items())]
        return command

    def _forget_keys(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


class SSHWorkers(_Launcher):
    """One ``zmqexecutor worker --connect`` per host, started with the system ``ssh`` client::

        with SSHWorkers(["node1", "node2"]) as w, ZMQExecutor(listen=w.address, keys=w.keys) as ex:
            results = list(ex.map(f, xs))

    ``ssh`` runs with your own configuration and agent (``ssh_options`` adds to them; ``BatchMode``
    is on, so a host that would ask for a password fails at once). Each remote worker gets its keys on
    the connection's standard input and stops when that closes: when this launcher stops, or when
    this process dies. A host whose worker does not start within ``start_timeout`` fails ``start()``
    with a ``LaunchError`` quoting its standard error; the other workers are then stopped too.

    Args:
        hosts: what ``ssh`` connects to: ``"node1"``, ``"user@node2"``, an alias of your ssh config.
        address: what the workers dial, ``"tcp://HOST:PORT"`` (the executor listens on it); default:
            this machine's address on the way to the first host, on a free port.
        keys: a ``zmqexecutor keygen`` folder to use; default: keys made for this run alone.
        processes: task processes per worker (default: each host's CPUs).
        resources: what each worker offers, ``{"gpu": 2}`` (``zmqexecutor worker --resources``).
        python: the remote interpreter, which must have zmqexecutor installed.
        ssh: the ssh client; ssh_options: extra arguments before the host (``["-p", "2222"]``).
        worker_options: extra ``zmqexecutor worker`` arguments (``["--drain-timeout", "60"]``).
    """

    def __init__(self, hosts: Union[str, Sequence[str]], *, address: Optional[str] = None,
                 keys: Optional[PathLike] = None, processes: Optional[int] = None, python: str = "python3",
                 ssh: str = "ssh", ssh_options: Sequence[str] = (), worker_options: Sequence[str] = (),
                 start_timeout: float = DEFAULT_START_TIMEOUT, idle_timeout: Optional[float] = None,
                 resources: Optional[Mapping[str, float]] = None) -> None:
        super().__init__(address, keys, processes, python, idle_timeout, start_timeout, resources)
        self.hosts = [hosts] if isinstance(hosts, str) else list(hosts)
        if not self.hosts:
            raise ValueError("hosts must not be empty")
        self.ssh = ssh
        self.ssh_options = list(ssh_options)
        self.worker_options = list(worker_options)
        self._workers: list[_RemoteWorker] = []
        self._stopping = False

    def start(self) -> None:
        """Start every host's worker; raise ``LaunchError`` (having stopped them) if any fails."""
        if self._workers:
            raise RuntimeError("these workers are started already")
        worker_keys = self._prepare(self._ssh_hostname(self.hosts[0]) if self._given_address is None else None)
        public, secret = load_key_pair(worker_keys / "worker.key_secret")
        line = keys_line(DialKeys(public, secret, load_public_key(worker_keys / "client.key")))
        remote = shlex.join(self._worker_command("--keys-from-stdin", "--exit-with-stdin", *self.worker_options))
        self._stopping = False
        for host in self.hosts:
            command = [self.ssh, "-o", "BatchMode=yes", *self.ssh_options, host, remote]
            self._workers.append(_RemoteWorker(host, command, line, self))
        deadline = time.monotonic() + self.start_timeout
        for worker in self._workers:
            worker.ready.wait(max(0.0, deadline - time.monotonic()))
        failed = [w for w in self._workers if not w.ready.is_set() or w.process.poll() is not None]
        if failed:
            self.stop()
            raise LaunchError("could not start workers on " + "; ".join(w.failure(self.start_timeout) for w in failed))
        logger.info("started %d worker(s) over SSH, dialling %s", len(self._workers), self.address)

    def stop(self) -> None:
        """Stop every worker: closing its standard input makes it drain (its running tasks finish,
        queued ones go back to the client) and exit, then ssh ends; what lingers is killed."""
        self._stopping = True
        for worker in self._workers:
            worker.close_stdin()
        deadline = time.monotonic() + STOP_GRACE
        for worker in self._workers:
            worker.end(max(0.0, deadline - time.monotonic()))
        self._workers = []
        self._forget_keys()

    def failed(self) -> dict[str, str]:
        """The hosts whose worker ended while it should run, each with why (its exit and standard error)."""
        return {w.host: w.failure(self.start_timeout) for w in self._workers if w.process.poll() is not None}

    def _ssh_hostname(self, host: str) -> str:
        # What the host is called after the user's ssh config has had its say (aliases, HostName).
        try:
            done = subprocess.run([self.ssh, "-G", *self.ssh_options, host], capture_output=True, text=True,
                                  timeout=10, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired):
            return host.rpartition("@")[2]
        for line in done.stdout.splitlines():
            key, _, value = line.partition(" ")
            if key == "hostname" and value:
                return value
        return host.rpartition("@")[2]


class _RemoteWorker:
    """One ssh process and what its worker says on standard error."""

    def __init__(self, host: str, command: list[str], keys: bytes, launcher: SSHWorkers) -> None:
        self.host = host
        self.launcher = launcher
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, start_new_session=True)
        assert self.process.stdin is not None and self.process.stderr is not None
        self.stdin: Optional[IO[bytes]] = self.process.stdin
        try:
            self.stdin.write(keys)
            self.stdin.flush()
        except OSError:
            pass  # ssh ended at once: its stderr says why
        threading.Thread(target=self._read, args=(self.process.stderr,), name=f"zmqexecutor-ssh-{host}",
                         daemon=True).start()

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            del self.lines[:-STDERR_TAIL_LINES * 5]
            if "zmqexecutor worker ready" in line:
                self.ready.set()
        code = self.process.wait()
        self.ready.set()  # wake start(): it ended
        if not self.launcher._stopping:
            logger.warning("the worker on %s ended (exit status %s): %s", self.host, code,
                           " | ".join(self.lines[-STDERR_TAIL_LINES:]) or "no output")

    def failure(self, start_timeout: float) -> str:
        code = self.process.poll()
        tail = "\n    ".join(self.lines[-STDERR_TAIL_LINES:]) or "(no output)"
        what = f"ssh exited with status {code}" if code is not None else \
            f"not started within start_timeout={start_timeout:g} s"
        return f"{self.host}: {what}:\n    {tail}"

    def close_stdin(self) -> None:
        if self.stdin is not None:
            try:
                self.stdin.close()
            except OSError:
                pass
            self.stdin = None

    def end(self, grace: float) -> None:
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            try:
                self.process.wait(2)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class SlurmWorkers(_Launcher):
    """A Slurm job of ``nodes`` dial-in workers, one per node (``sbatch``, then ``srun`` in the job)::

        with SlurmWorkers(nodes=4, partition="compute", time_limit="2:00:00") as w, \\
                ZMQExecutor(listen=w.address, keys=w.keys) as ex:
            ex.wait_for_workers(4, timeout=600)
            results = list(ex.map(f, xs))

    Each worker runs as many task processes as the job has CPUs on its node (``SLURM_CPUS_ON_NODE``;
    ``processes`` overrides; ask for CPUs with ``sbatch_lines=["--cpus-per-task=32"]`` or
    ``["--exclusive"]``). ``start()`` returns once the job runs and raises ``LaunchError`` when it
    fails or its workers are not all running within ``start_timeout`` (then it is cancelled), with
    the end of the job's output. ``stop()`` cancels it.
    The job's keys and output go to a fresh folder under ``folder``, readable by you alone, which the
    nodes must see: by default ``~/.zmqexecutor/jobs`` (home is shared on most clusters).

    Args:
        nodes: how many nodes, so how many workers.
        partition, time_limit (``"HH:MM:SS"`` or minutes), account: as ``sbatch`` takes them.
        sbatch_lines: more ``#SBATCH`` options, one per item (``"--mem=64G"``).
        address: what the workers dial; default: this machine's name, on a free port.
        python: the interpreter on the nodes (default: this one, which suits a shared file system).
        idle_timeout: a worker with no client this long stops (a client that died without cancelling).
        resources: what each worker offers, ``{"gpu": 4}`` (``zmqexecutor worker --resources``); ask
            Slurm for them too (``sbatch_lines=["--gres=gpu:4"]``).
    """

    def __init__(self, nodes: int = 1, *, partition: Optional[str] = None, time_limit: Optional[str] = None,
                 account: Optional[str] = None, sbatch_lines: Sequence[str] = (), address: Optional[str] = None,
                 keys: Optional[PathLike] = None, processes: Optional[int] = None, python: str = sys.executable,
                 folder: Optional[PathLike] = None, job_name: str = "zmqexecutor",
                 start_timeout: float = 300.0, idle_timeout: Optional[float] = DEFAULT_IDLE_TIMEOUT,
                 resources: Optional[Mapping[str, float]] = None) -> None:
        super().__init__(address, keys, processes, python, idle_timeout, start_timeout, resources)
        if not isinstance(nodes, int) or nodes < 1:
            raise ValueError("nodes must be a positive integer")
        self.nodes = nodes
        self.options = [f"--job-name={job_name}", f"--nodes={nodes}", "--ntasks-per-node=1"]
        for flag, value in (("--partition", partition), ("--time", time_limit), ("--account", account)):
            if value is not None:
                self.options.append(f"{flag}={value}")
        self.options += [line if line.startswith("-") else f"--{line}" for line in sbatch_lines]
        self.folder = Path(folder).expanduser() if folder is not None else Path.home() / ".zmqexecutor" / "jobs"
        self.job_id: Optional[str] = None
        self.output: Optional[Path] = None

    def start(self) -> None:
        """Submit the job and wait until every node's worker has started; raise ``LaunchError``
        (having cancelled the job) if it fails or is not that far within ``start_timeout``."""
        if self.job_id is not None:
            raise RuntimeError("this job is submitted already")
        worker_keys = self._prepare(None, parent=self.folder)
        assert self._folder is not None
        run_folder = self._folder
        script = run_folder / "job.sh"
        worker = shlex.join(self._worker_command("--keys", str(worker_keys)))
        if self.processes is None:  # each node's own count, so expanded there
            worker += ' --processes "${SLURM_CPUS_ON_NODE:-1}"'
        lines = ["#!/bin/bash", *(f"#SBATCH {option}" for option in self.options),
                 f"#SBATCH --output={run_folder / 'slurm-%j.out'}",
                 "# Written by zmqexecutor's SlurmWorkers: one worker per node, dialling the client.",
                 f"exec srun --ntasks-per-node=1 bash -c {shlex.quote('exec ' + worker)}"]
        script.write_text("\n".join(lines) + "\n")
        done = _run(["sbatch", "--parsable", str(script)])
        if done.returncode != 0:
            self._forget_keys()
            raise LaunchError(f"sbatch refused the job: {done.stderr.strip() or done.stdout.strip()}")
        self.job_id = done.stdout.strip().split(";")[0]
        self.output = run_folder / f"slurm-{self.job_id}.out"
        logger.info("submitted Slurm job %s (%d node(s)), its workers dialling %s", self.job_id, self.nodes,
                    self.address)
        deadline = time.monotonic() + self.start_timeout
        while True:
            state, reason = self.state()
            if state == "RUNNING" and self.workers_started() >= self.nodes:
                return
            if state not in ("PENDING", "CONFIGURING", "RUNNING", "RESIZING", "REQUEUED"):
                problem = f"Slurm job {self.job_id} ended before its workers ran ({state or 'gone'})"
                break
            if time.monotonic() >= deadline:
                problem = (f"Slurm job {self.job_id}'s {self.nodes} worker(s) were not running within "
                           f"start_timeout={self.start_timeout:g} s (job state {state}"
                           f"{', reason ' + reason if reason and reason != 'None' else ''}; "
                           f"{self.workers_started()} started)")
                break
            time.sleep(SLURM_POLL_INTERVAL)
        tail = self.output_tail()
        self.stop()
        raise LaunchError(problem + (":\n    " + tail.replace("\n", "\n    ") if tail else ""))

    def workers_started(self) -> int:
        """How many of the job's workers have said they are ready, in its output."""
        try:
            assert self.output is not None
            return self.output.read_text(errors="replace").count("zmqexecutor worker ready")
        except (OSError, AssertionError):
            return 0

    def state(self) -> tuple[str, str]:
        """The job's state and reason as ``squeue`` tells them; ``("", "")`` once it left the queue."""
        done = _run(["squeue", "-h", "-j", str(self.job_id), "-o", "%T %r"])
        words = done.stdout.split(None, 1) if done.returncode == 0 else []
        return (words[0], words[1].strip() if len(words) > 1 else "") if words else ("", "")

    def output_tail(self) -> str:
        """The end of the job's output (its workers' standard error)."""
        try:
            assert self.output is not None
            return "\n".join(self.output.read_text(errors="replace").splitlines()[-STDERR_TAIL_LINES:])
        except (OSError, AssertionError):
            return ""

    def stop(self) -> None:
        """Cancel the job and wait until it has left the queue; remove its keys."""
        if self.job_id is not None:
            _run(["scancel", str(self.job_id)])
            deadline = time.monotonic() + STOP_GRACE
            while self.state()[0] and time.monotonic() < deadline:
                time.sleep(SLURM_POLL_INTERVAL)
            self.job_id = None
        self._forget_keys()


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise LaunchError(f"{command[0]} is not installed here (or not on PATH): is this a Slurm login node?") from None
    except subprocess.TimeoutExpired:
        raise LaunchError(f"{shlex.join(command)} did not answer within 60 s") from None


def with_free_port(address: str) -> str:
    """``address`` with a free port in place of port 0 or ``*`` (workers must be told a real one)."""
    parsed = parse(address, bind=True)
    if parsed.transport != "tcp" or parsed.port not in ("0", "*"):
        return address
    return _free_port_address(parsed.host)


def _free_port_address(host: str) -> str:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host.strip("[]"), 0))
        port = s.getsockname()[1]
    return f"tcp://[{host.strip('[]')}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def default_address(near: Optional[str]) -> str:
    """``tcp://ADDRESS:PORT``: this machine's address on the route towards ``near`` (no packet is
    sent: a UDP socket is only connected), or its name's, and a port free right now."""
    host = None
    if near is not None:
        try:
            family, _, _, _, peer = socket.getaddrinfo(near, 22, type=socket.SOCK_DGRAM)[0]
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect(peer)
                host = probe.getsockname()[0]
        except OSError:
            host = None
    if host is None:
        host = socket.gethostbyname(socket.getfqdn())
    return _free_port_address(host)
