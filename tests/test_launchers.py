"""The launchers for real: SSH against a real sshd on a second host (a network namespace), Slurm
against a real Slurm (slurmctld here, two slurmds on another host), workers dialling back in."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import alive, free_port, wait_until

from zmqexecutor import LaunchError, SlurmWorkers, SSHWorkers, ZMQExecutor

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


def exactly_once(folder: str, nap: float = 0.02):
    # Defined here so that it is pickled by value: the SSH host has no tests folder on its path.
    def mark(i: int) -> int:
        # O_EXCL: a task that ran twice fails its second run.
        os.close(os.open(os.path.join(folder, str(i)), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        time.sleep(nap)
        return i
    return mark


def command_lines() -> list[str]:
    lines = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                lines.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                pass
    return lines


def secret_of(folder: Path) -> str:
    text = (folder / "worker.key_secret").read_text()
    return text.split('secret-key = "', 1)[1].split('"', 1)[0]


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "zmqexecutor", "keygen", str(tmp_path / "keys")], check=True,
                   capture_output=True, timeout=60)
    return tmp_path / "keys"


def test_a_map_over_slurm_and_ssh_workers_that_join_late_and_leave_runs_each_task_once(
        slurm_cluster, ssh_host, keys: Path, tmp_path: Path, monkeypatch) -> None:
    env, slurm_side = slurm_cluster
    host, ssh_side, options = ssh_host
    monkeypatch.setenv("SLURM_CONF", env["SLURM_CONF"])
    done = tmp_path / "done"
    done.mkdir()
    port = free_port()
    # One port on every interface; each launcher's workers dial the address their network reaches.
    with SlurmWorkers(nodes=2, address=f"tcp://{slurm_side}:{port}", keys=keys, folder=tmp_path / "jobs",
                      processes=1, start_timeout=60) as slurm, \
            ZMQExecutor(listen=f"tcp://0.0.0.0:{port}", keys=keys / "client", connect_timeout=None) as ex:
        ex.wait_for_workers(2, timeout=60)
        results = ex.map(exactly_once(str(done)), range(600))
        got = [next(results) for _ in range(50)]
        with SSHWorkers([host], address=f"tcp://{ssh_side}:{port}", keys=keys, ssh_options=options,
                        python=sys.executable, processes=1) as ssh:  # joins late
            assert wait_until(lambda: sum(w.state == "ready" for w in ex.workers()) == 3, timeout=30)
            assert not any(secret_of(keys / "worker") in line for line in command_lines())
            leaving = ex.workers()[0].pid  # a Slurm worker leaves mid-run, gracefully
            assert leaving is not None
            os.kill(leaving, signal.SIGTERM)
            got += [next(results) for _ in range(200)]
            assert ssh.failed() == {}
        got += list(results)  # the SSH worker left too, at the end of its block
        assert got == list(range(600))
        assert sorted(int(name) for name in os.listdir(done)) == list(range(600))
        assert slurm.job_id is not None and slurm.state()[0] == "RUNNING"
        assert wait_until(lambda: len(ex.workers()) == 1, timeout=15)


def test_ssh_workers_stop_with_the_launcher_and_take_their_keys_over_stdin(ssh_host) -> None:
    host, here, options = ssh_host
    with SSHWorkers([host, host], address=f"tcp://{here}:0", ssh_options=options, python=sys.executable,
                    processes=1, resources={"gpu": 1}) as w:
        assert w.keys is not None and w.keys.is_dir()
        secret = secret_of(w.keys.parent / "worker")
        with ZMQExecutor(listen=w.address, keys=w.keys) as ex:
            ex.wait_for_workers(2, timeout=30)
            assert sum(ex.map(abs, range(-100, 0))) == 5050
            assert [info.resources for info in ex.workers()] == [{"gpu": 1.0}] * 2  # passed through
            assert sum(ex.options(resources={"gpu": 1}).map(abs, range(-10, 0))) == 55
            pids = [info.pid for info in ex.workers()]
            assert not any(secret in line for line in command_lines())
    assert not w.keys.exists()  # the keys made for the run went with it
    assert wait_until(lambda: not any(alive(pid) for pid in pids if pid), timeout=15)


def test_an_ssh_host_that_fails_to_start_is_reported_with_its_stderr(ssh_host) -> None:
    host, here, options = ssh_host
    with pytest.raises(LaunchError, match=r"(?s)could not start workers on .*exited with status 127.*"
                                          r"/nowhere/python: No such file"):
        SSHWorkers([host], address=f"tcp://{here}:0", ssh_options=options, python="/nowhere/python").start()
    unreachable = [*options, "-p", str(free_port())]  # nothing listens there
    began = time.monotonic()
    with pytest.raises(LaunchError, match=r"(?s)exited with status 255.*Connection refused"):
        SSHWorkers([host], address=f"tcp://{here}:0", ssh_options=unreachable, python=sys.executable).start()
    assert time.monotonic() - began < 30


def test_a_slurm_job_that_fails_or_never_starts_is_reported_and_cancelled(slurm_cluster, tmp_path: Path,
                                                                          monkeypatch) -> None:
    env, here = slurm_cluster
    monkeypatch.setenv("SLURM_CONF", env["SLURM_CONF"])
    jobs = tmp_path / "jobs"
    with pytest.raises(LaunchError, match=r"(?s)ended before its workers ran.*/nowhere/python"):
        SlurmWorkers(address=f"tcp://{here}:0", python="/nowhere/python", folder=jobs, start_timeout=60).start()
    later = SlurmWorkers(address=f"tcp://{here}:0", sbatch_lines=["--begin=now+3600"], folder=jobs, start_timeout=3)
    with pytest.raises(LaunchError, match=r"were not running within start_timeout=3 s \(job state PENDING"):
        later.start()
    queue = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True, timeout=30).stdout
    assert queue.strip() == ""  # cancelled on the way out
    with pytest.raises(LaunchError, match="sbatch refused the job: .*invalid partition"):
        SlurmWorkers(partition="nosuch", address=f"tcp://{here}:0", folder=jobs).start()
    assert list(jobs.iterdir()) == []  # no keys left behind


def test_a_slurm_job_is_cancelled_when_the_launcher_stops(slurm_cluster, tmp_path: Path, monkeypatch) -> None:
    env, here = slurm_cluster
    monkeypatch.setenv("SLURM_CONF", env["SLURM_CONF"])
    # Whole nodes: each worker runs as many task processes as the allocation has CPUs there.
    with SlurmWorkers(nodes=2, address=f"tcp://{here}:0", folder=tmp_path / "jobs", sbatch_lines=["--exclusive"]) as w:
        job = w.job_id
        with ZMQExecutor(listen=w.address, keys=w.keys) as ex:
            ex.wait_for_workers(2, timeout=60)
            assert {info.slots for info in ex.workers()} == {os.cpu_count()}
            pids = [info.pid for info in ex.workers()]
    queue = subprocess.run(["squeue", "-h", "-j", str(job)], capture_output=True, text=True, timeout=30)
    assert queue.stdout.strip() == ""
    assert wait_until(lambda: not any(alive(pid) for pid in pids if pid), timeout=15)


def test_the_ssh_command_runs_workers_until_interrupted(ssh_host, keys: Path) -> None:
    host, here, options = ssh_host
    address = f"tcp://{here}:{free_port()}"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "zmqexecutor", "ssh", host, "--connect", address, "--keys", str(keys),
         "--python", sys.executable, "--processes", "1", *(f"--ssh-option={o}" for o in options)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with ZMQExecutor(listen=address, keys=keys / "client") as ex:
            ex.wait_for_workers(1, timeout=30)
            assert ex.submit(sum, [1, 2, 3]).result(timeout=30) == 6
            pid = ex.workers()[0].pid
            launcher.send_signal(signal.SIGINT)
            assert launcher.wait(30) == 0
            assert wait_until(lambda: pid is not None and not alive(pid), timeout=15)
        assert f"1 worker(s) dialling {address}" in launcher.stdout.read()  # type: ignore[union-attr]
    finally:
        if launcher.poll() is None:
            launcher.kill()


def test_the_slurm_command_submits_a_job_and_cancels_it_when_interrupted(slurm_cluster, keys: Path,
                                                                         tmp_path: Path) -> None:
    env, here = slurm_cluster
    address = f"tcp://{here}:{free_port()}"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "zmqexecutor", "slurm", "--connect", address, "--keys", str(keys), "--nodes", "2",
         "--processes", "1", "--folder", str(tmp_path / "jobs"), "--sbatch-line=--job-name=zx-cli"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        with ZMQExecutor(listen=address, keys=keys / "client") as ex:
            ex.wait_for_workers(2, timeout=60)
            assert sum(ex.map(abs, range(-10, 0))) == 55
            names = subprocess.run(["squeue", "-h", "-o", "%j"], env=env, capture_output=True, text=True,
                                   timeout=30).stdout.split()
            assert names == ["zx-cli"]
            launcher.send_signal(signal.SIGINT)
            assert launcher.wait(60) == 0
            assert subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True,
                                  timeout=30).stdout.strip() == ""
            assert wait_until(lambda: ex.workers() == (), timeout=15)
        assert "dialling " + address in launcher.stdout.read()  # type: ignore[union-attr]
    finally:
        if launcher.poll() is None:
            launcher.kill()


_KILLED_CLIENT = '''
import sys
from zmqexecutor import SSHWorkers, ZMQExecutor
w = SSHWorkers([{host!r}], address={address!r}, ssh_options={options!r}, python=sys.executable, processes=1)
w.start()
ex = ZMQExecutor(listen=w.address, keys=w.keys)
ex.wait_for_workers(1, timeout=30)
print(ex.workers()[0].pid, flush=True)
ex.submit(__import__("time").sleep, 600)
sys.stdin.read()
'''


def test_ssh_workers_end_when_their_client_is_killed(ssh_host, tmp_path: Path) -> None:
    host, here, options = ssh_host
    script = tmp_path / "client.py"
    script.write_text(_KILLED_CLIENT.format(host=host, address=f"tcp://{here}:0", options=options))
    client = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert client.stdout is not None
        worker = int(client.stdout.readline())
        assert alive(worker)
        client.kill()  # no clean-up at all: the SSH connection's end is the worker's lifeline
        client.wait()
        # It drains: the running task may take up to --drain-timeout (30 s) to be stopped.
        assert wait_until(lambda: not alive(worker), timeout=45)
    finally:
        if client.poll() is None:
            client.kill()


def run_until_stopped(ex: ZMQExecutor, job: SlurmWorkers, task, give_up: float) -> list[int]:
    """Keep both workers busy (a few tasks waiting beyond the running ones) until ``job`` has left the
    queue, then finish; the results in order."""
    futures = []
    deadline = time.monotonic() + give_up
    while job.state()[0] and time.monotonic() < deadline:
        futures += [ex.submit(task, len(futures) + i) for i in range(4)]
        concurrent.futures.wait(futures[-8:-4] or futures, timeout=30)
    assert not job.state()[0], "the job was not stopped in time"
    futures += [ex.submit(task, len(futures) + i) for i in range(8)]  # and the one left still serves
    return [f.result(timeout=60) for f in futures]


@pytest.mark.parametrize("stop", ["scancel", "time limit"])
def test_a_slurm_job_stopped_mid_map_drains_and_each_task_runs_once(slurm_cluster, keys: Path, tmp_path: Path,
                                                                     monkeypatch, stop: str) -> None:
    env, here = slurm_cluster
    monkeypatch.setenv("SLURM_CONF", env["SLURM_CONF"])
    done = tmp_path / "done"
    done.mkdir()
    port = free_port()
    address = f"tcp://{here}:{port}"
    # Slurm signals every process of the job (SIGTERM, then SIGKILL after KillWait): the worker drains.
    with SlurmWorkers(address=address, keys=keys, folder=tmp_path / "jobs", processes=2, job_name="ending",
                      time_limit="1" if stop == "time limit" else None, start_timeout=60) as ending, \
            SlurmWorkers(address=address, keys=keys, folder=tmp_path / "jobs", processes=2, start_timeout=60), \
            ZMQExecutor(listen=f"tcp://0.0.0.0:{port}", keys=keys / "client", max_retries=0,
                        connect_timeout=None) as ex:
        ex.wait_for_workers(2, timeout=60)
        if stop == "scancel":
            threading.Timer(3.0, subprocess.run, (["scancel", str(ending.job_id)],)).start()
        # Slower tasks, so that some run when the job is stopped.
        results = run_until_stopped(ex, ending, exactly_once(str(done), nap=0.2), give_up=150)
        output = ending.output_tail()
    assert results == list(range(len(results)))
    assert sorted(int(name) for name in os.listdir(done)) == results
    assert "draining" in output and "killed by" not in output, output
