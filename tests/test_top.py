"""``zmqexecutor top`` in a real terminal: tmux runs it, ``capture-pane`` reads the screen,
``send-keys`` presses Ctrl-C."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid

import pytest
from conftest import ROOT, wait_until

from zmqexecutor import ZMQExecutor

pytest.importorskip("rich")
pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (apt-get install tmux)")]


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def tmux(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, timeout=30)


def test_top_shows_the_workers_live_and_quits_on_ctrl_c(start_worker) -> None:
    busy, quiet = start_worker(processes=2), start_worker(processes=1)
    session = f"zx-top-{uuid.uuid4().hex[:8]}"
    command = shlex.join([sys.executable, "-m", "zmqexecutor", "top", busy.endpoint, quiet.endpoint, "--interval", "0.3"])
    env = [f"{name}={os.environ[name]}" for name in ("XDG_CONFIG_HOME",) if name in os.environ]
    started = tmux("new-session", "-d", "-s", session, "-x", "200", "-y", "20",
                   *[arg for pair in env for arg in ("-e", pair)], "-e", f"PYTHONPATH={ROOT}", "-e", "COLUMNS=200", command)
    assert started.returncode == 0, started.stderr

    def screen() -> str:
        return tmux("capture-pane", "-p", "-t", session).stdout

    try:
        assert wait_until(lambda: screen().count("ready") == 2, timeout=30), screen()
        assert "zmqexecutor top" in screen() and "tasks/s" in screen()
        with ZMQExecutor([busy.endpoint]) as ex:
            running = ex.map(nap, [0.5] * 6)
            # While the map runs, the busy worker's row shows its two slots taken; afterwards six done.
            assert wait_until(lambda: any(busy.endpoint in line and " 2 " in line.split("ready", 1)[1][:30]
                                          for line in screen().splitlines() if "ready" in line), timeout=30), screen()
            assert list(running) == [0.5] * 6
        row = lambda: next(line for line in screen().splitlines() if busy.endpoint in line)  # noqa: E731
        assert wait_until(lambda: " 6 " in row(), timeout=30), screen()
        assert "MiB" in row()
        tmux("send-keys", "-t", session, "C-c")
        assert wait_until(lambda: tmux("has-session", "-t", session).returncode != 0, timeout=15), screen()
    finally:
        tmux("kill-session", "-t", session)
