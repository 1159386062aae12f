"""One descriptor over many: readable while any of a set of sockets can be read (or written, when asked),
so that a loop that polls other things too (a supervisor's zmq.Poller, the client's selector) waits on
one descriptor for all the task processes' sockets.

Run in the thread that owns the sockets (a supervisor's loop, the client's I/O thread); the portable
kind adds a thread of its own, described below.

On Linux that descriptor is an epoll instance (``EpollSet``), which another poll can watch. Elsewhere
(macOS, the BSDs, or ``ZMQEXECUTOR_PORTABLE=1``) ``WatchedSet`` keeps a ``selectors`` selector (kqueue,
or poll) and a watcher thread that waits on it and makes a pipe readable when something is ready; the
owner then looks with a second selector of the same registrations (two threads may not poll one), and
says when it has taken what was ready (``taken``), after which the watcher waits again. That costs a
thread wake-up per batch of messages, and nothing while idle.
"""

from __future__ import annotations

import os
import select
import selectors
import threading
from typing import Union

from . import _features

# (fd, readable or closed, writable)
Ready = list[tuple[int, bool, bool]]


class EpollSet:
    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.read_events = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR

    def fileno(self) -> int:
        return self.epoll.fileno()

    def register(self, fd: int, write: bool = False) -> None:
        self.epoll.register(fd, select.EPOLLIN | select.EPOLLOUT if write else select.EPOLLIN)

    def modify(self, fd: int, write: bool) -> None:
        self.epoll.modify(fd, select.EPOLLIN | select.EPOLLOUT if write else select.EPOLLIN)

    def unregister(self, fd: int) -> None:
        self.epoll.unregister(fd)

    def ready(self) -> Ready:
        read_events = self.read_events
        return [(fd, bool(events & read_events), bool(events & select.EPOLLOUT)) for fd, events in self.epoll.poll(0)]

    def taken(self) -> None:
        pass  # level-triggered: whatever is still unread keeps the descriptor readable

    def close(self) -> None:
        self.epoll.close()


class WatchedSet:
    def __init__(self) -> None:
        self.owner_view = selectors.DefaultSelector()
        self.watcher_view = selectors.DefaultSelector()
        self.signal_r, self.signal_w = os.pipe()  # readable: something is ready
        self.wake_r, self.wake_w = os.pipe()  # the watcher looks again (registrations changed, closing)
        for fd in (self.signal_r, self.signal_w, self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        self.watcher_view.register(self.wake_r, selectors.EVENT_READ)
        self.resume = threading.Event()
        self.resume.set()
        self.closed = False
        self.thread = threading.Thread(target=self.watch, name="zmqexecutor-readiness", daemon=True)
        self.thread.start()

    def fileno(self) -> int:
        return self.signal_r

    def register(self, fd: int, write: bool = False) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0)
        self.owner_view.register(fd, events)
        self.watcher_view.register(fd, events)
        self.nudge()

    def modify(self, fd: int, write: bool) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0)
        self.owner_view.modify(fd, events)
        self.watcher_view.modify(fd, events)
        self.nudge()

    def unregister(self, fd: int) -> None:
        self.owner_view.unregister(fd)
        self.watcher_view.unregister(fd)
        self.nudge()

    def ready(self) -> Ready:
        _drain(self.signal_r)
        return [(key.fd, bool(events & selectors.EVENT_READ), bool(events & selectors.EVENT_WRITE))
                for key, events in self.owner_view.select(0)]

    def taken(self) -> None:
        self.resume.set()

    def nudge(self) -> None:
        try:
            os.write(self.wake_w, b"\0")
        except BlockingIOError:
            pass  # it has plenty of nudges waiting already

    def watch(self) -> None:
        while True:
            self.resume.wait()
            if self.closed:
                return
            try:
                ready = self.watcher_view.select()
            except (OSError, ValueError, KeyError):  # a descriptor closed under it: look again
                continue
            if self.closed:
                return
            if any(key.fd != self.wake_r for key, _ in ready):
                self.resume.clear()  # until the owner has taken it: the sockets stay ready meanwhile
                try:
                    os.write(self.signal_w, b"\0")
                except BlockingIOError:
                    pass
            _drain(self.wake_r)

    def close(self) -> None:
        self.closed = True
        self.resume.set()
        self.nudge()
        self.thread.join(5)
        self.owner_view.close()
        self.watcher_view.close()
        for fd in (self.signal_r, self.signal_w, self.wake_r, self.wake_w):
            os.close(fd)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


ReadinessSet = Union[EpollSet, WatchedSet]


def readiness_set() -> ReadinessSet:
    return EpollSet() if _features.EPOLL else WatchedSet()
