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
