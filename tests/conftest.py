from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import zmq

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

# Started in the background by a non-interactive shell, the run inherits SIGINT ignored, and so would
# every script the tests start (ignored signals stay ignored across exec): the Ctrl-C tests need it.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True, scope="session")
def own_key_store(tmp_path_factory) -> Iterator[Path]:
    """This user's key store (which secures loopback TCP by default) in a folder of the test run, not in
    the real home: workers and clients started by the tests inherit it through the environment."""
    previous = os.environ.get("XDG_CONFIG_HOME")
    folder = tmp_path_factory.mktemp("config")
    os.environ["XDG_CONFIG_HOME"] = str(folder)
    yield folder / "zmqexecutor" / "keys"
    if previous is None:
        os.environ.pop("XDG_CONFIG_HOME", None)
    else:
        os.environ["XDG_CONFIG_HOME"] = previous


def mark_then_nap(marker: str, seconds: float) -> int:
    """A task that says it started (its pid in ``marker``, written whole at once), then sleeps."""
    partial = f"{marker}.partial"
    Path(partial).write_text(str(os.getpid()))
    os.replace(partial, marker)  # a reader that sees the file sees all of it
    time.sleep(seconds)
    return os.getpid()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children_of(pid: int) -> set[int]:
    """All live descendants of ``pid``, read from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                parents[int(entry)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def local_worker_pid(executor) -> int:
    """The embedded local worker's pid, as ``workers()`` reports it once the worker has answered."""
    assert wait_until(lambda: executor.workers()[0].pid is not None, timeout=30)
    return executor.workers()[0].pid


def state_of(executor, endpoint: str) -> str:
    return next(w.state for w in executor.workers() if w.endpoint == endpoint)


def is_broken(executor) -> bool:
    from zmqexecutor import BrokenWorkerPool

    try:
        executor.submit(abs, 1)
    except BrokenWorkerPool:
        return True
    return False


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@contextlib.contextmanager
def raw_dealer(endpoint: str) -> Iterator[zmq.Socket]:
    """A bare DEALER socket connected to ``endpoint``: a peer that speaks the protocol by hand."""
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.connect(endpoint)
    try:
        yield sock
    finally:
        sock.close(0)
        context.term()


class WorkerProcess:
    """A real ``zmqexecutor worker`` started through the command line."""

    def __init__(self, endpoint: str, processes: int = 2, extra: list[str] | None = None,
                 prefix: list[str] | None = None, connect: bool = False, own_group: bool = False) -> None:
        self.endpoint = endpoint
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")]))
        self.process = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "zmqexecutor", "worker", "--connect" if connect else "--bind",
             endpoint, "--processes", str(processes), *(extra or [])],
            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, text=True,
            start_new_session=own_group,  # a process group of its own, to signal as a whole
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            if "worker ready" in line:
                # The worker may have been asked for any free port ("tcp://127.0.0.1:*").
                self.endpoint = line.split("ready: ", 1)[1].split("=", 1)[1].split()[0]
                self._ready.set()

    def wait_ready(self, timeout: float = 20.0) -> "WorkerProcess":
        if not self._ready.wait(timeout):
            raise AssertionError(f"worker on {self.endpoint} not ready: {''.join(self.lines)}")
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self) -> int:
        if self.process.poll() is None:
            # SIGINT stops at once; SIGTERM would drain, waiting for whatever a test left running.
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture
def start_worker() -> Iterator:
    started: list[WorkerProcess] = []

    def start(endpoint: str | None = None, processes: int = 2, wait: bool = True, extra: list[str] | None = None,
              connect: bool = False) -> WorkerProcess:
        worker = WorkerProcess(endpoint or "tcp://127.0.0.1:*", processes, extra, connect=connect)
        started.append(worker)
        return worker.wait_ready() if wait else worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """A fresh ``zmqexecutor keygen`` folder: ``keys/worker`` and ``keys/client``."""
    done = subprocess.run([sys.executable, "-m", "zmqexecutor", "keygen", str(tmp_path / "keys")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return tmp_path / "keys"


@pytest.fixture
def tcp_endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@contextlib.contextmanager
def network_namespace(index: int = 0):
    """A network namespace joined to this one by a veth pair: a second host on one machine. Yields
    its name, its address, and a function that takes its link down or up."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2's ip")
    tag = f"{os.getpid() % 100000}{'abcdefgh'[index]}"
    name, host_if, ns_if = f"zx{tag}", f"zxh{tag}", f"zxn{tag}"
    subnet = f"10.{os.getpid() % 200 + 20}.{(os.getpid() // 200 + index * 7) % 250}"
    try:
        _ip("netns", "add", name)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot create a network namespace here: {exc.stderr.strip()}")
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", name)
        _ip("addr", "add", f"{subnet}.1/24", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("netns", "exec", name, "ip", "addr", "add", f"{subnet}.2/24", "dev", ns_if)
        _ip("netns", "exec", name, "ip", "link", "set", ns_if, "up")
        _ip("netns", "exec", name, "ip", "link", "set", "lo", "up")

        def link(up: bool) -> None:
            _ip("netns", "exec", name, "ip", "link", "set", ns_if, "up" if up else "down")

        yield name, f"{subnet}.2", link
    finally:
        _ip("link", "del", host_if, check=False)
        _ip("netns", "del", name, check=False)


@pytest.fixture
def namespace():
    """A network namespace joined to this one by a veth pair: a second host on one machine."""
    with network_namespace() as made:
        yield made


def wait_for_system_packages() -> None:
    """.ci/run installs sshd, Slurm and munge while the tests run; the tests that need them wait for
    that here (it names a file it writes once apt-get is done) instead of skipping."""
    done = os.environ.get("ZMQEXECUTOR_TEST_PACKAGES_DONE")
    # Within the tests' own time limit; by the time the first of them runs, the install is long over.
    if done and not wait_until(lambda: os.path.exists(done), timeout=100):
        pytest.fail("the system packages for this test were still being installed")


@pytest.fixture
def ssh_host(namespace, tmp_path: Path):
    """A real OpenSSH server (Debian's openssh-server) in the network namespace: a second host to ssh
    to, as root, with a key made for this test. Yields (its address, this host's address on that
    link, the ssh options that reach it)."""
    wait_for_system_packages()
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.path.exists(sshd) or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("needs OpenSSH (apt-get install openssh-server openssh-client)")
    name, address, _ = namespace
    folder = tmp_path / "ssh"
    folder.mkdir(mode=0o700)
    for key in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / key)], check=True,
                       timeout=30)
    shutil.copy(folder / "user_key.pub", folder / "authorized_keys")
    config = folder / "sshd_config"
    config.write_text(f"ListenAddress {address}\nPort 22\nHostKey {folder / 'host_key'}\n"
                      f"AuthorizedKeysFile {folder / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
                      "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                      f"PidFile {folder / 'sshd.pid'}\nLogLevel ERROR\nAcceptEnv NONE\n")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # its privilege separation folder
    server = subprocess.Popen(["ip", "netns", "exec", name, sshd, "-D", "-e", "-f", str(config)],
                              stderr=subprocess.PIPE, text=True)
    options = ["-i", str(folder / "user_key"), "-o", f"UserKnownHostsFile={folder / 'known_hosts'}",
               "-o", "StrictHostKeyChecking=accept-new", "-o", "ConnectTimeout=10", "-F", "/dev/null"]
    try:
        up = wait_until(lambda: subprocess.run(["ssh", *options, "-o", "BatchMode=yes", f"root@{address}", "true"],
                                               capture_output=True, timeout=15).returncode == 0, timeout=20)
        if not up:
            server.terminate()
            pytest.fail(f"sshd did not start: {server.communicate(timeout=10)[1]}")
        yield f"root@{address}", address.rsplit(".", 1)[0] + ".1", options
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(10)


def _munge_works() -> bool:
    try:
        encoded = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        return encoded.returncode == 0 and subprocess.run(
            ["unmunge"], input=encoded.stdout, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


SLURM_NODES = 4


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A real Slurm (Debian's slurmctld, slurmd and munge; facts in shared/notes/single-node-slurm.md):
    the controller here and four compute nodes, slurmds at four addresses of a network namespace (so
    srun's traffic between them needs no forwarding through this host). Yields (the environment that
    points sbatch and friends at it, the address the nodes reach here)."""
    wait_for_system_packages()
    if any(shutil.which(tool) is None for tool in ("slurmctld", "slurmd", "sbatch", "munged")):
        pytest.skip("needs Slurm and munge (apt-get install slurmctld slurmd slurm-client munge)")
    with contextlib.ExitStack() as stack:
        name, first, _ = stack.enter_context(network_namespace(1))
        subnet = first.rsplit(".", 1)[0]
        here = f"{subnet}.1"
        for extra in range(3, 3 + SLURM_NODES - 1):
            _ip("netns", "exec", name, "ip", "addr", "add", f"{subnet}.{extra}/24", "dev", f"zxn{os.getpid() % 100000}b")
        nodes = [(f"zxnode{i}", f"{subnet}.{i + 1}", 6817 + i) for i in range(1, SLURM_NODES + 1)]
        daemons: list[subprocess.Popen] = []

        def stop_daemons() -> None:
            for daemon in reversed(daemons):
                if daemon.poll() is None:
                    daemon.terminate()
            for daemon in daemons:
                try:
                    daemon.wait(10)
                except subprocess.TimeoutExpired:
                    daemon.kill()

        stack.callback(stop_daemons)
        if not _munge_works():
            os.makedirs("/run/munge", exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            daemons.append(subprocess.Popen(["runuser", "-u", "munge", "--", "munged", "-F"],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            if not wait_until(_munge_works, timeout=10):
                pytest.fail("munged did not start")
        folder = tmp_path_factory.mktemp("slurm")
        (folder / "state").mkdir(parents=True)
        controller = socket.gethostname().split(".")[0]
        node_lines = "\n".join(f"NodeName={node} NodeAddr={address} Port={port} CPUs={os.cpu_count()} State=UNKNOWN"
                                for node, address, port in nodes)
        conf = folder / "slurm.conf"
        conf.write_text(f"""ClusterName=zxtest
SlurmctldHost={controller}({here})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=batch_sched_delay=0
MailProg=/bin/true
ReturnToService=2
StateSaveLocation={folder / 'state'}
SlurmdSpoolDir={folder}/spool-%n
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd-%n.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd-%n.log
{node_lines}
PartitionName=zx Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        env = dict(os.environ, SLURM_CONF=str(conf))
        daemons.append(subprocess.Popen(["slurmctld", "-D"], env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL))
        for node, _, _ in nodes:
            # nsenter, not "ip netns exec": that remounts /sys, and slurmd needs the real one (cgroups, CPUs).
            daemons.append(subprocess.Popen(["nsenter", f"--net=/run/netns/{name}", "slurmd", "-D", "-N", node],
                                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

        def idle() -> bool:
            shown = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=env, capture_output=True, text=True,
                                   timeout=10).stdout.split()
            return shown.count("idle") == len(nodes)

        if not wait_until(idle, timeout=30, interval=0.3):
            logs = "\n".join(p.read_text()[-2000:] for p in folder.glob("*.log"))
            pytest.fail(f"the Slurm nodes did not come up:\n{logs}")
        yield env, here
