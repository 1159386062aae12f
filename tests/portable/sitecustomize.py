"""The tests' portable mode: with this folder first on PYTHONPATH, every Python process started (the
tests, clients, workers, task processes) runs without the calls that only Linux has, as on macOS or a
BSD. What Python cannot take away (prctl through ctypes, /proc, madvise) zmqexecutor leaves alone when
ZMQEXECUTOR_PORTABLE=1, which this sets."""

import os
import select
import socket

os.environ["ZMQEXECUTOR_PORTABLE"] = "1"
for module, names in ((select, ("epoll", "EPOLLIN", "EPOLLOUT", "EPOLLHUP", "EPOLLERR", "EPOLLET",
                                "EPOLLEXCLUSIVE", "EPOLLONESHOT", "EPOLLPRI", "EPOLLRDHUP", "EPOLL_CLOEXEC")),
                      (os, ("eventfd", "eventfd_read", "eventfd_write", "EFD_CLOEXEC", "EFD_NONBLOCK",
                            "EFD_SEMAPHORE", "sched_getaffinity", "sched_setaffinity", "memfd_create",
                            "pidfd_open", "splice")),
                      (socket, ("SO_PEERCRED", "MSG_NOSIGNAL"))):
    for name in names:
        if hasattr(module, name):
            delattr(module, name)

import selectors  # noqa: E402  (chosen at its import, which may have come before this)

if selectors.DefaultSelector is getattr(selectors, "EpollSelector", None):
    selectors.DefaultSelector = selectors.PollSelector  # type: ignore[misc]
