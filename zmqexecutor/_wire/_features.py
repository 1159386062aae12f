"""What this host offers beyond POSIX, found once at import: each Linux-only speed-up sits behind one
name here, and the code that uses it has a portable fallback of the same behaviour.

Run by every process (client, supervisor, task process); read-only after import.

=================== ================================================ ====================================
name                used for                                         without it
=================== ================================================ ====================================
EPOLL               one descriptor over many (a Listener's peers);   ``selectors`` (kqueue on macOS and
                    a caller pausing the I/O thread's interest       the BSDs, else poll); the I/O thread
                                                                     reads every reply itself
EVENTFD             the bell that wakes a caller reading its reply   (the caller path is off, as above)
PEERCRED            the uid of a process that connects to a private  ``getpeereid`` (macOS, the BSDs);
                    Unix socket (SO_PEERCRED)                        else the folder's 0700 mode alone
PDEATHSIG           a task process dies with its supervisor at once  a thread that watches the parent
                    (prctl)
AFFINITY            the CPUs this process may use                    ``os.cpu_count()``
POPULATE            fresh pages for large messages made at once      plain anonymous memory
                    (MAP_POPULATE, MADV_POPULATE_WRITE)
PROC                cgroup CPU quotas (/proc/self/cgroup)            no quota
FORK_EARLY          the first task processes forked before threads   spawned
MEMFD               one copy per host of a buffer a worker keeps:    each task process gets its own copy
                    task processes map the supervisor's memfd        with each task
                    (memfd_create, /proc/PID/fd)
=================== ================================================ ====================================

``ZMQEXECUTOR_PORTABLE=1`` in the environment turns all of them off, for testing the fallbacks on Linux
(``tests/portable``: it also removes the Linux-only calls from ``select``, ``os`` and ``socket``).
"""

from __future__ import annotations

import os
import select
import socket
import struct
import sys
from typing import Any, Optional

PORTABLE = os.environ.get("ZMQEXECUTOR_PORTABLE") == "1"
LINUX = sys.platform.startswith("linux") and not PORTABLE
WINDOWS = sys.platform == "win32"

EPOLL = hasattr(select, "epoll") and not PORTABLE
EVENTFD = hasattr(os, "eventfd") and not PORTABLE
PEERCRED = hasattr(socket, "SO_PEERCRED") and not PORTABLE
PDEATHSIG = LINUX
AFFINITY = hasattr(os, "sched_getaffinity") and not PORTABLE
POPULATE = LINUX
PROC = LINUX
# Forking is only known to be safe on Linux (macOS frameworks break in forked children).
FORK_EARLY = LINUX
MEMFD = hasattr(os, "memfd_create") and LINUX


def summary() -> dict[str, bool]:
    """Which features this process found (for logs, tests and bug reports)."""
    return dict(epoll=EPOLL, eventfd=EVENTFD, peercred=PEERCRED, pdeathsig=PDEATHSIG, affinity=AFFINITY,
                populate=POPULATE, proc=PROC, fork_early=FORK_EARLY, memfd=MEMFD)


def local_workers_unsupported() -> Optional[str]:
    """Why this system cannot run local workers (the embedded default, ``zmqexecutor worker``), or None."""
    if WINDOWS or not hasattr(socket, "AF_UNIX") or not hasattr(os, "fork"):
        return (f"zmqexecutor's workers (the local default and `zmqexecutor worker`) run on Linux, macOS "
                f"and the BSDs, not on {sys.platform}: start workers on such a host (WSL is one) and give "
                "ZMQExecutor their endpoints, e.g. ZMQExecutor(['tcp://node1:5555'])")
    return None


def peer_uid(sock: socket.socket) -> Optional[int]:
    """The user id of the process at the other end of a Unix socket; None where the system cannot tell
    (then the private folder the socket lives in is the only guard)."""
    if PEERCRED:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return int(struct.unpack("3i", creds)[1])
    if _getpeereid is None:
        return None
    import ctypes  # only where SO_PEERCRED is missing (macOS, the BSDs)

    uid, gid = ctypes.c_uint32(), ctypes.c_uint32()
    if _getpeereid(sock.fileno(), ctypes.byref(uid), ctypes.byref(gid)) != 0:
        return None
    return uid.value


def _find_getpeereid() -> Any:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return libc.getpeereid
    except (OSError, AttributeError, TypeError):
        return None


_getpeereid = None if PEERCRED or WINDOWS else _find_getpeereid()
