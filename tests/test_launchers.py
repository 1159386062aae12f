"""The launchers for real: SSH against a real sshd on a second host (a network namespace), Slurm
against a real single-node Slurm (slurmctld here, slurmd on the other hosts)."""

from __future__ import annotations

import pytest

from zmqexecutor import SSHWorkers, ZMQExecutor

pytestmark = pytest.mark.timeout(120)


def test_ssh_workers_dial_in_and_run_a_map(ssh_host) -> None:
    host, here, options = ssh_host
    import sys
    with SSHWorkers([host, host], address=f"tcp://{here}:0", ssh_options=options, python=sys.executable,
                    processes=1) as w, ZMQExecutor(listen=w.address, keys=w.keys) as ex:
        ex.wait_for_workers(2, timeout=30)
        assert sum(ex.map(abs, range(-100, 0))) == 5050


def test_slurm_workers_run_on_two_nodes(slurm_cluster, tmp_path, monkeypatch) -> None:
    env, here = slurm_cluster
    monkeypatch.setenv("SLURM_CONF", env["SLURM_CONF"])
    from zmqexecutor import SlurmWorkers
    with SlurmWorkers(nodes=2, address=f"tcp://{here}:0", folder=tmp_path / "jobs", processes=1) as w, \
            ZMQExecutor(listen=w.address, keys=w.keys) as ex:
        ex.wait_for_workers(2, timeout=60)
        hosts = {info.endpoint for info in ex.workers()}
        assert len(hosts) == 2
        assert sum(ex.map(abs, range(-100, 0))) == 5050
