"""CurveZMQ keys, authentication and bounds, with real workers, sockets and key files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
from conftest import free_port, wait_until

from zmqexecutor import MessageTooLargeError, NoWorkersError, SecurityError, ZMQExecutor
from zmqexecutor._wire import _protocol as proto
from zmqexecutor._wire import _security
from zmqexecutor._wire._protocol import Kind


def write_canary(path: str) -> str:
    Path(path).write_text("ran")
    return path


def big_result(nbytes: int) -> bytes:
    return b"x" * nbytes


def run_cli(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zmqexecutor", *argv], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def other_keys(tmp_path):
    assert run_cli("keygen", str(tmp_path / "other")).returncode == 0
    return tmp_path / "other"


@pytest.fixture
def secured_worker(start_worker, keys):
    return start_worker("tcp://0.0.0.0:*", processes=1, extra=["--keys", str(keys / "worker")])


def loopback(endpoint: str) -> str:
    return endpoint.replace("0.0.0.0", "127.0.0.1")


# --- keys ----------------------------------------------------------------------------------------


def test_keygen_writes_private_secrets_and_splits_the_sides(keys) -> None:
    assert sorted(p.name for p in (keys / "worker").iterdir()) == ["client.key", "worker.key", "worker.key_secret"]
    assert sorted(p.name for p in (keys / "client").iterdir()) == ["client.key", "client.key_secret", "worker.key"]
    for folder in (keys, keys / "worker", keys / "client"):
        assert folder.stat().st_mode & 0o777 == 0o700
    for secret in (keys / "worker" / "worker.key_secret", keys / "client" / "client.key_secret"):
        assert secret.stat().st_mode & 0o777 == 0o600
    worker_public, _ = _security.load_key_pair(keys / "worker" / "worker.key_secret")
    assert _security.load_public_key(keys / "client" / "worker.key") == worker_public
    again = run_cli("keygen", str(keys))
    assert again.returncode == 1 and "already exists; pass --force" in again.stderr
    assert run_cli("keygen", str(keys), "--force").returncode == 0
    assert _security.load_public_key(keys / "client" / "worker.key") != worker_public


@pytest.mark.parametrize("target, mode", [("file", 0o640), ("file", 0o604), ("folder", 0o750), ("folder", 0o705)])
def test_loose_permissions_on_a_secret_key_are_refused(keys, target, mode) -> None:
    secret = keys / "worker" / "worker.key_secret"
    os.chmod(secret if target == "file" else secret.parent, mode)
    out = run_cli("worker", "--bind", "tcp://127.0.0.1:0", "--keys", str(keys / "worker"))
    assert out.returncode == 2
    assert "is accessible by other users" in out.stderr and "chmod" in out.stderr
    os.chmod(keys / "client", mode) if target == "folder" else os.chmod(keys / "client" / "client.key_secret", mode)
    with pytest.raises(SecurityError, match="accessible by other users"):
        ZMQExecutor("tcp://127.0.0.1:1", keys=keys / "client")


def test_missing_and_malformed_keys_are_clear_errors(keys, tmp_path) -> None:
    out = run_cli("worker", "--bind", "tcp://127.0.0.1:0", "--keys", str(tmp_path / "nowhere"))
    assert out.returncode == 2 and "does not exist" in out.stderr
    (keys / "worker" / "client.key").write_text('metadata\ncurve\n    public-key = "short"\n')
    out = run_cli("worker", "--bind", "tcp://127.0.0.1:0", "--keys", str(keys / "worker"))
    assert out.returncode == 2 and "malformed" in out.stderr
    (keys / "client" / "client.key_secret").write_text("garbage")
    with pytest.raises(SecurityError, match="malformed key file"):
        ZMQExecutor("tcp://127.0.0.1:1", keys=keys / "client")
    with pytest.raises(SecurityError, match="key folder .* does not exist"):
        ZMQExecutor("tcp://127.0.0.1:1", keys=tmp_path / "nowhere")


def test_the_top_key_folder_is_pointed_at_its_right_half(keys) -> None:
    out = run_cli("worker", "--bind", "tcp://127.0.0.1:0", "--keys", str(keys))
    assert out.returncode == 2 and f"the worker's keys are in {keys / 'worker'}: pass that folder" in out.stderr
    with pytest.raises(SecurityError, match="the client's keys are in .*client: pass that folder"):
        ZMQExecutor("tcp://127.0.0.1:1", keys=keys)


def test_old_or_curveless_libzmq_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(zmq, "zmq_version_info", lambda: (4, 3, 2))
    with pytest.raises(SecurityError, match="known CurveZMQ vulnerabilities"):
        _security.require_curve()
    monkeypatch.setattr(zmq, "has", lambda capability: False)
    with pytest.raises(SecurityError, match="without CurveZMQ"):
        _security.require_curve()


# --- authentication ------------------------------------------------------------------------------


def test_a_secured_worker_serves_a_client_with_the_right_keys(secured_worker, keys) -> None:
    assert "security=CurveZMQ (1 allowed client keys)" in secured_worker.log()
    # Its start-up self-check (a throwaway key, refused) does not read like an intrusion.
    assert "rejected a client" not in secured_worker.log()
    with ZMQExecutor(loopback(secured_worker.endpoint), keys=keys / "client") as ex:
        assert ex.submit(abs, -5).result(timeout=30) == 5


def test_keys_from_the_environment(secured_worker, keys, monkeypatch) -> None:
    monkeypatch.setenv("ZMQEXECUTOR_KEYS", str(keys / "client"))
    with ZMQExecutor(loopback(secured_worker.endpoint)) as ex:
        assert ex.submit(abs, -6).result(timeout=30) == 6


def test_a_key_folder_under_home_may_be_written_with_a_tilde(secured_worker, keys, monkeypatch) -> None:
    # "~/keys" from a config file or a quoted $ZMQEXECUTOR_KEYS is not expanded by any shell.
    monkeypatch.setenv("HOME", str(keys.parent))
    monkeypatch.setenv("ZMQEXECUTOR_KEYS", "~/keys/client")
    with ZMQExecutor(loopback(secured_worker.endpoint)) as ex:
        assert ex.submit(abs, -7).result(timeout=30) == 7


def test_per_endpoint_worker_keys(secured_worker, keys, other_keys) -> None:
    endpoint = loopback(secured_worker.endpoint)
    # The client's own pair is on the allow list; the folder's default worker key is another worker's.
    (other_keys / "client" / "client.key_secret").write_bytes((keys / "client" / "client.key_secret").read_bytes())
    with ZMQExecutor(endpoint, keys=other_keys / "client",
                     worker_keys={endpoint: keys / "client" / "worker.key"}) as ex:
        assert ex.submit(abs, -7).result(timeout=30) == 7


@pytest.mark.slow  # each waits out a refused handshake; libzmq decides, not Python
@pytest.mark.parametrize("case", ["no keys", "key not allowed", "wrong worker key"])
def test_unauthenticated_clients_never_run_anything(secured_worker, keys, other_keys, tmp_path, case) -> None:
    endpoint = loopback(secured_worker.endpoint)
    canary = tmp_path / "canary"
    options = {
        "no keys": {},
        "key not allowed": {"keys": other_keys / "client",
                            "worker_keys": {endpoint: keys / "client" / "worker.key"}},
        "wrong worker key": {"keys": keys / "client", "worker_keys": {endpoint: other_keys / "client" / "worker.key"}},
    }[case]
    expected = {
        "no keys": "the secure handshake failed",  # libzmq names no single reason for this one
        "key not allowed": "the worker refused our key",
        "wrong worker key": "the worker's public key is not the pinned one",
    }[case]
    started = time.monotonic()
    with ZMQExecutor(endpoint, connect_timeout=60, **options) as ex:
        error = ex.submit(write_canary, str(canary)).exception(timeout=30)
        # A definite refusal fails at once instead of waiting out connect_timeout.
        assert time.monotonic() - started < 10
    assert isinstance(error, NoWorkersError) and expected in str(error) and "no worker can be used" in str(error)
    assert not canary.exists()
    if case == "key not allowed":
        assert wait_until(lambda: "rejected a client with unknown public key" in secured_worker.log())
    # A raw peer without a session is not served either, even on a plain socket.
    context = zmq.Context()
    raw = context.socket(zmq.DEALER)
    raw.connect(endpoint)
    raw.send_multipart([proto.encode_header(Kind.TASK, 1), *proto.encode_call(write_canary, (str(canary),), {})])
    time.sleep(1.0)
    raw.close(0)
    context.term()
    assert not canary.exists()
    assert secured_worker.process.poll() is None


def test_a_public_bind_needs_keys_or_insecure(keys) -> None:
    assert "needs --keys (or, at your own risk, --insecure)" in " ".join(run_cli("worker", "--help").stdout.split())
    out = run_cli("worker", "--bind", f"tcp://0.0.0.0:{free_port()}")
    assert out.returncode == 2 and "without keys" in out.stderr
    with subprocess.Popen([sys.executable, "-m", "zmqexecutor", "worker", "--bind", f"tcp://0.0.0.0:{free_port()}",
                           "--insecure", "--processes", "1"], stderr=subprocess.PIPE, text=True) as worker:
        assert worker.stderr is not None
        lines = []
        for line in worker.stderr:
            lines.append(line)
            if "worker ready" in line:
                break
        worker.terminate()
        worker.wait(15)
    assert any("INSECURE" in line and "run any code" in line for line in lines)


def test_the_client_refuses_plain_text_to_other_hosts() -> None:
    with pytest.raises(SecurityError, match="refusing to send tasks to tcp://10.0.0.1:5555 in plain text"):
        ZMQExecutor("tcp://10.0.0.1:5555")
    with pytest.raises(SecurityError, match="plain text"):
        ZMQExecutor(["tcp://127.0.0.1:5555", "tcp://node1.example:5555"])
    ZMQExecutor("tcp://10.0.0.1:5555", insecure=True, connect_timeout=1).shutdown()
    with pytest.raises(ValueError, match="embedded local workers are private"):
        ZMQExecutor(keys="anything")


# --- size bounds ---------------------------------------------------------------------------------


def test_an_oversized_task_fails_its_future_at_submit() -> None:
    with ZMQExecutor(max_workers=1, max_message_size=1 << 20) as ex:
        future = ex.submit(len, b"x" * (2 << 20))
        assert future.done()
        with pytest.raises(MessageTooLargeError, match="more than max_message_size=1048576"):
            future.result()
        assert ex.submit(len, b"x" * 1000).result(timeout=30) == 1000


def test_an_oversized_result_fails_its_future(start_worker) -> None:
    worker = start_worker(processes=1)
    with ZMQExecutor(worker.endpoint, max_message_size=1 << 20) as ex:
        with pytest.raises(MessageTooLargeError, match="result is .* bytes, more than the client's max_message_size"):
            ex.submit(big_result, 2 << 20).result(timeout=30)
        assert len(ex.submit(big_result, 1000).result(timeout=30)) == 1000


def test_a_task_bigger_than_the_workers_limit_is_not_sent(start_worker) -> None:
    worker = start_worker(processes=1, extra=["--max-message-size", str(1 << 20)])
    with ZMQExecutor(worker.endpoint) as ex:
        with pytest.raises(MessageTooLargeError, match="more than worker .* accepts"):
            ex.submit(len, b"x" * (2 << 20)).result(timeout=30)
        assert ex.submit(len, b"x" * 10).result(timeout=30) == 10


def test_a_peer_sending_an_oversized_frame_is_disconnected_and_the_worker_lives(start_worker) -> None:
    worker = start_worker(processes=1, extra=["--max-message-size", str(1 << 16), "--insecure"])
    context = zmq.Context()
    raw = context.socket(zmq.DEALER)
    monitor = raw.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    raw.connect(worker.endpoint)
    try:
        raw.send(b"x" * (1 << 17))
        assert monitor.poll(10_000), "the worker did not drop the peer"
        with ZMQExecutor(worker.endpoint, insecure=True) as ex:
            assert ex.submit(abs, -3).result(timeout=30) == 3
        assert worker.process.poll() is None
    finally:
        raw.disable_monitor()
        monitor.close(0)
        raw.close(0)
        context.term()


# --- other users of the same host -----------------------------------------------------------------

STRANGER = "zxstranger"


@pytest.fixture(scope="module")
def stranger() -> tuple[int, int, Path]:
    """A second local user (made here, as root), for what other users of a shared host can do."""
    import pwd
    import shutil

    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("making a second local user needs root and useradd")
    try:
        pwd.getpwnam(STRANGER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/usr/sbin/nologin", STRANGER], check=True,
                       capture_output=True, timeout=60)
    entry = pwd.getpwnam(STRANGER)
    return entry.pw_uid, entry.pw_gid, Path(entry.pw_dir)


def as_user(user: tuple[int, int, Path], job, ready=None) -> "subprocess.Popen | int":
    """Run ``job()`` in a child that became ``user`` (the modules it needs are loaded already: that user
    may not read this Python's files); returns the child's pid and a reader for what ``job`` returned."""
    import json

    import zmq.auth.thread  # noqa: F401  (loaded lazily by the client; the user could not read it later)

    uid, gid, home = user
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            os.environ["HOME"] = str(home)
            os.environ.pop("XDG_CONFIG_HOME", None)
            os.environ.pop("ZMQEXECUTOR_KEYS", None)
            outcome = job(lambda: os.write(write_fd, b"ready\n"))
        except BaseException as exc:
            outcome = {"error": repr(exc)}
        os.write(write_fd, (json.dumps(outcome) + "\n").encode())
        os._exit(0)
    os.close(write_fd)
    reader = os.fdopen(read_fd)
    return pid, reader


def finish(pid: int, reader) -> dict:
    import json

    lines = [line for line in reader.read().splitlines() if line != "ready"]
    os.waitpid(pid, 0)
    return json.loads(lines[-1])


@pytest.mark.slow
def test_another_local_user_cannot_run_a_task_on_a_loopback_worker(stranger, start_worker, tmp_path) -> None:
    worker = start_worker()  # tcp://127.0.0.1, no keys given: this user's own store secures it
    canary = tmp_path / "canary"
    os.chmod(tmp_path, 0o777)  # so that a task run as us on the stranger's behalf could write here

    def try_to_run(ready) -> dict:
        # What the stranger would write: no keys (then their own store, which is not ours), or plain text.
        outcome = {}
        for insecure in (False, True):
            with ZMQExecutor([worker.endpoint], connect_timeout=5, insecure=insecure) as ex:
                try:
                    ex.submit(write_canary, str(canary)).result(timeout=30)
                    outcome[str(insecure)] = "ran"
                except NoWorkersError:
                    outcome[str(insecure)] = "refused"
        outcome["own_store"] = (Path.home() / ".config/zmqexecutor/keys/client/client.key_secret").exists()
        return outcome

    outcome = finish(*as_user(stranger, try_to_run))
    assert outcome == {"False": "refused", "True": "refused", "own_store": True}, outcome
    assert not canary.exists()
    status = run_cli("status", worker.endpoint)
    assert "security CurveZMQ" in status.stdout and "tasks done 0" in status.stdout, status.stdout
    # And a raw socket without keys gets nowhere either: the handshake itself fails.
    with ZMQExecutor([worker.endpoint]) as ours:
        assert ours.submit(abs, -7).result(timeout=30) == 7  # while we, the same user, just work


@pytest.mark.slow
def test_another_local_user_cannot_pose_as_our_worker(stranger, tmp_path) -> None:
    plain, curve = free_port(), free_port()

    def pose_as_worker(ready) -> dict:
        # The stranger binds our worker's port first: in plain text, or with CurveZMQ keys of their own.
        context = zmq.Context()
        sockets = {}
        for name, port in (("plain", plain), ("curve", curve)):
            sock = sockets[name] = context.socket(zmq.ROUTER)
            if name == "curve":
                sock.curve_server = True
                sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
            sock.bind(f"tcp://127.0.0.1:{port}")
        stop: list[int] = []
        signal.signal(signal.SIGUSR1, lambda *_: stop.append(1))  # our client is done
        ready()
        heard = {name: 0 for name in sockets}
        deadline = time.monotonic() + 15
        while not stop and time.monotonic() < deadline:
            for name, sock in sockets.items():
                if sock.poll(50):
                    sock.recv_multipart()
                    heard[name] += 1
        for name, sock in sockets.items():  # and what came just before the end
            while sock.poll(500):
                sock.recv_multipart()
                heard[name] += 1
        for sock in sockets.values():
            sock.close(0)
        context.term()
        return heard

    pid, reader = as_user(stranger, pose_as_worker)
    assert reader.readline().strip() == "ready"
    for port in (plain, curve):
        with ZMQExecutor([f"tcp://127.0.0.1:{port}"], connect_timeout=4) as ex:
            with pytest.raises(NoWorkersError):
                ex.submit(write_canary, str(tmp_path / "canary")).result(timeout=30)
    os.kill(pid, signal.SIGUSR1)
    # Not even our HELLO reached them: the handshake failed first (it pins this user's worker key).
    assert finish(pid, reader) == {"plain": 0, "curve": 0}
    assert not (tmp_path / "canary").exists()


def test_a_worker_whose_authenticator_lets_strangers_in_refuses_to_start(keys, tmp_path) -> None:
    # Fault injection: an allow list that admits any key (as a broken or missing ZAP handler would).
    # The worker's start-up self-check, a connection with a throwaway key, must catch it.
    (tmp_path / "sitecustomize.py").write_text(
        "import zmqexecutor._wire._curve as s\n"
        "s._AllowList.callback = lambda self, domain, key: True\n")
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "zmqexecutor", "worker", "--bind", f"tcp://127.0.0.1:{port}",
                           "--keys", str(keys / "worker"), "--processes", "1"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2, done.stderr
    assert "refusing to run: a client with an unknown key was let in" in done.stderr
    assert "worker ready" not in done.stderr


def test_keys_sent_on_stdin_are_checked_before_use() -> None:
    import zmq

    from zmqexecutor._wire._curve import DialKeys
    from zmqexecutor._wire._security import keys_from_line, keys_line

    public, secret = zmq.curve_keypair()
    client, _ = zmq.curve_keypair()
    line = keys_line(DialKeys(public, secret, client))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert keys_from_line(line) == DialKeys(public, secret, client)
    other, _ = zmq.curve_keypair()
    with pytest.raises(SecurityError, match="does not belong to its secret key"):
        keys_from_line(keys_line(DialKeys(other, secret, client)))
    with pytest.raises(SecurityError, match="malformed client public key"):
        keys_from_line(keys_line(DialKeys(public, secret, b"short")))
    with pytest.raises(SecurityError, match="one JSON line"):
        keys_from_line(b'{"public": "x"}\n')
