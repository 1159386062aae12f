"""The feature tests (_features): what Linux gives is found, the portable mode takes it all away, and a
system without local workers (Windows) says so at once while a client of remote workers runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT, TESTS

from zmqexecutor._wire import _features

PORTABLE = os.environ.get("ZMQEXECUTOR_PORTABLE") == "1"


def run_python(code: str, *args: str, portable: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
    paths = [str(TESTS / "portable")] if portable else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*paths, str(TESTS), str(ROOT)]))
    if not portable:
        env.pop("ZMQEXECUTOR_PORTABLE", None)
        env["PYTHONPATH"] = os.pathsep.join(p for p in env["PYTHONPATH"].split(os.pathsep) if "portable" not in p)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux has every feature")
def test_linux_has_every_feature_and_portable_mode_none() -> None:
    found = run_python("import zmqexecutor._wire._features as f; print(sorted(k for k, v in f.summary().items() if v))")
    assert found.stdout.split("\n")[0] == str(sorted(_features.summary())), found.stderr
    gone = run_python("import zmqexecutor._wire._features as f, select, os; "
                      "print(any(f.summary().values()), hasattr(select, 'epoll'), hasattr(os, 'eventfd'))",
                      portable=True)
    assert gone.stdout.split() == ["False", "False", "False"], gone.stderr


def test_the_peer_of_a_unix_socket_is_this_user_where_the_system_tells() -> None:
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        uid = _features.peer_uid(left)
    if _features.PEERCRED or _features._getpeereid is not None:
        assert uid == os.getuid()
    else:
        assert uid is None  # the private folder is the only guard then


_WINDOWS_LIKE = """
import os, select, selectors, socket, sys
# The standard library's own platform switches, taken as on this system; then zmqexecutor's, as on Windows.
import ctypes.util, multiprocessing.connection, multiprocessing.reduction, subprocess, concurrent.futures.process
import asyncio, cloudpickle, zmq, zmq.utils.monitor, zmq.auth.thread
sys.platform = "win32"  # and what Windows lacks
for module, names in ((os, ("fork", "getuid", "eventfd")), (socket, ("AF_UNIX", "SO_PEERCRED")),
                      (select, ("epoll", "poll"))):
    for name in names:
        if hasattr(module, name):
            delattr(module, name)
selectors.DefaultSelector = selectors.SelectSelector
import zmqexecutor
from zmqexecutor import ZMQExecutor
try:
    ZMQExecutor()
except NotImplementedError as exc:
    print("embedded:", exc)
with ZMQExecutor(sys.argv[1], insecure=True) as ex:
    print("remote:", sum(ex.map(abs, range(-10, 0))))
from zmqexecutor._tools._cli import main
sys.argv = ["zmqexecutor", "worker", "--bind", "tcp://127.0.0.1:0"]
print("worker exit status:", main())
"""


@pytest.mark.timeout(90)
def test_on_windows_a_client_of_remote_workers_runs_and_local_workers_are_refused_at_once(start_worker) -> None:
    worker = start_worker(extra=["--insecure"])
    out = run_python(_WINDOWS_LIKE, worker.endpoint)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("embedded: zmqexecutor's workers (the local default and `zmqexecutor worker`) "
                               "run on Linux, macOS and the BSDs, not on win32")
    assert lines[1:] == ["remote: 55", "worker exit status: 2"]
    assert "cannot run a worker here" in out.stderr and "Traceback" not in out.stderr
