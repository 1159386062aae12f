"""The embedded default: a worker on this machine, started and owned by one executor."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

logger = logging.getLogger("zmqexecutor")

# After SIGTERM the local worker stops its task processes (which takes up to its own grace period);
# past this it is killed.
STOP_TIMEOUT = 5.0


class LocalWorker:
    """A ``zmqexecutor worker`` subprocess bound to ``ipc://`` in a folder only this user can enter."""

    def __init__(self, processes: int) -> None:
        self.private_dir = tempfile.mkdtemp(prefix="zmqexecutor-")  # mode 0700
        self.endpoint = f"ipc://{self.private_dir}/worker"
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
            "--log-level", level,
        ]
        self.env = env
        self.process: Optional[subprocess.Popen[bytes]] = None
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
