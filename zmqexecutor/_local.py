"""The embedded default: a worker on this machine, started and owned by one executor."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Optional

logger = logging.getLogger("zmqexecutor")

# After SIGTERM the local worker stops its task processes (which takes up to its own grace period);
# past this it is killed.
STOP_TIMEOUT = 5.0

# A local worker that dies is started again, its tasks retried like those of any lost worker; but one
# that died this many times within the window is being killed on purpose or cannot run here, and
# restarting it forever would hide that: the executor breaks instead.
LOCAL_RESTARTS = 3
LOCAL_RESTART_WINDOW = 60.0


class LocalWorker:
    """A ``zmqexecutor worker`` subprocess bound to ``ipc://`` in a folder only this user can enter."""

    def __init__(self, processes: int) -> None:
        self.private_dir = tempfile.mkdtemp(prefix="zmqexecutor-")  # mode 0700
        self.endpoint = f"ipc://{self.private_dir}/worker"
        # Its task processes exchange tasks with the executor here, without the supervisor's relay.
        self.direct_address = f"{self.private_dir}/direct"
        env = dict(os.environ)
        # Like multiprocessing's spawn: the task processes see the same import path as this process,
        # so functions from the user's own modules unpickle there.
        env["PYTHONPATH"] = os.pathsep.join(p or os.getcwd() for p in sys.path)
        level = "DEBUG" if logger.isEnabledFor(logging.DEBUG) else "WARNING"
        self.command = [
            sys.executable, "-m", "zmqexecutor", "worker",
            "--bind", self.endpoint,
            "--processes", str(processes),
            "--parent-pid", str(os.getpid()),
            "--direct", self.direct_address,
            "--log-level", level,
        ]
        self.env = env
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.restarts: list[float] = []
        try:
            self.start()
        except BaseException:
            shutil.rmtree(self.private_dir, ignore_errors=True)
            raise

    def start(self) -> None:
        """Start the worker process, again after it died: on the same endpoint, which it binds anew."""
        # A session of its own: Ctrl-C in the user's terminal must not kill the worker under a running
        # executor; the executor stops it, and it stops itself if we die.
        self.process = subprocess.Popen(self.command, env=self.env, stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.process.pid

    def exit_code(self) -> Optional[int]:
        return None if self.process is None else self.process.poll()

    def revive(self, *, never_ready: bool, stopping: bool) -> Optional[str]:
        """If the worker died, start it again; returns why the executor must break instead, or None."""
        code = self.exit_code()
        if code is None:
            return None
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < LOCAL_RESTART_WINDOW]
        # One that never answered is not going to: its start-up fails, and its log on stderr says why.
        if stopping or never_ready or len(self.restarts) >= LOCAL_RESTARTS:
            often = f" ({len(self.restarts) + 1} times in {LOCAL_RESTART_WINDOW:g} s)" if self.restarts else ""
            return (f"the executor's local worker process (pid {self.pid}) exited unexpectedly with code "
                    f"{code}{often}; the executor is not usable anymore")
        logger.warning("the local worker process (pid %d) exited unexpectedly with code %s; starting it again",
                       self.pid, code)
        self.restarts.append(now)
        try:
            self.start()
        except OSError as exc:
            return (f"the executor's local worker process exited with code {code} and could not be started "
                    f"again: {exc}; the executor is not usable anymore")
        return None

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    logger.warning("local worker %d did not stop in %.0f s; killing it", process.pid, STOP_TIMEOUT)
                    process.kill()
                    process.wait()
        shutil.rmtree(self.private_dir, ignore_errors=True)
