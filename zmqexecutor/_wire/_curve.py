"""CurveZMQ on a live socket: the keys a socket is set up with, the client's side of the handshake and
what its failures mean, and the guard (a ZAP authenticator) of a socket that others connect to.
Reading, making and choosing keys on disk is ``_security``'s, loaded only where keys are used.

Runs in the client (its I/O thread), the supervisor and the status command; the ZAP authenticator runs
in a thread of pyzmq's in the process whose socket it guards.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping, NamedTuple, Optional

import zmq

from ._errors import SecurityError
from ._sockets import monitor_events

logger = logging.getLogger("zmqexecutor")

# libzmq releases before 4.3.3 have published CurveZMQ/ZMTP vulnerabilities (CVE-2019-6250,
# CVE-2019-13132, CVE-2020-15166); with keys we refuse them rather than pretend to be safe.
MIN_LIBZMQ = (4, 3, 3)

ZAP_DOMAIN = "zmqexecutor"

# The worker proves at start-up, with a throwaway key, that its authenticator rejects strangers.
SELF_CHECK_TIMEOUT = 10.0


def require_curve() -> None:
    if not zmq.has("curve"):
        raise SecurityError("this libzmq was built without CurveZMQ support; security cannot be provided")
    if zmq.zmq_version_info() < MIN_LIBZMQ:
        raise SecurityError(
            f"libzmq {zmq.zmq_version()} has known CurveZMQ vulnerabilities; "
            f"{'.'.join(map(str, MIN_LIBZMQ))} or newer is required (pip install -U pyzmq)"
        )


# --- a client's socket ------------------------------------------------------------------------------

# How a client's libzmq reports a refused handshake (socket-monitor events), in words for the user.
HANDSHAKE_FAILURES: dict[int, str] = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the worker refused our key (it is not on the worker's allow list)",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "the secure handshake failed: one side uses CurveZMQ keys and the "
                                         "other does not",
    # libzmq reports a key mismatch this way, and sometimes a missing key on one side too.
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "the secure handshake failed: the worker's public key is not the "
                                          "pinned one, or only one side uses keys",
}
HANDSHAKE_FAILURE_EVENTS = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | \
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


class ClientKeys(NamedTuple):
    public: bytes
    secret: bytes
    worker_keys: Mapping[str, bytes]  # endpoint -> pinned worker public key
    default_worker_key: Optional[bytes]
    tcp_only: bool = False  # the user's own store, used for loopback TCP; ipc:// endpoints go without

    def applies_to(self, endpoint: str) -> bool:
        return not self.tcp_only or endpoint.startswith("tcp://")

    def worker_key(self, endpoint: str) -> bytes:
        key = self.worker_keys.get(endpoint, self.default_worker_key)
        if key is None:
            raise SecurityError(f"no worker public key for {endpoint}: put worker.key in the key folder "
                                "or pass worker_keys={endpoint: key file}")
        return key


def secure_client_socket(sock: zmq.Socket[Any], keys: ClientKeys, endpoint: str) -> None:
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret
    sock.curve_serverkey = keys.worker_key(endpoint)


# --- a worker that dials its client, and a client that workers dial in to ---------------------------


class DialKeys(NamedTuple):
    """A dialling worker's CurveZMQ keys: its own pair, and the client's public key it pins."""

    public: bytes
    secret: bytes
    client: bytes


class ListenKeys(NamedTuple):
    """A listening client's CurveZMQ keys: its own pair (it is the server), and the workers it lets in."""

    public: bytes
    secret: bytes
    allowed: frozenset[bytes]


# --- the guard of a socket others connect to ------------------------------------------------------


class _AllowList:
    def __init__(self, allowed: set[bytes], peers: str) -> None:
        self.allowed = allowed
        self.peers = peers
        self.self_check_key: Optional[bytes] = None  # the worker's own throwaway key, refused on purpose

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.allowed:
            return True
        if key == self.self_check_key:
            logger.debug("self-check: a connection with a throwaway key was refused, as it must be")
        else:
            logger.warning("rejected a %s with unknown public key %s", self.peers, key.decode(errors="replace"))
        return False


class Guard:
    """The ZAP authenticator of the socket that others connect to (a worker's bound endpoint, or a
    client's ``listen`` address), in that socket's own ZeroMQ context."""

    def __init__(self, context: zmq.Context[Any], public: bytes, secret: bytes, allowed: set[bytes], *,
                 peers: str = "client", log: str = "zmqexecutor.worker.zap") -> None:
        require_curve()
        self.public, self.secret, self.allowed = public, secret, allowed
        from zmq.auth.thread import ThreadAuthenticator

        self.authenticator = ThreadAuthenticator(context, log=logging.getLogger(log))
        self.authenticator.start()
        self.policy = _AllowList(self.allowed, peers)
        self.authenticator.configure_curve_callback(ZAP_DOMAIN, self.policy)

    def secure(self, sock: zmq.Socket[Any]) -> None:
        sock.zap_domain = ZAP_DOMAIN.encode()
        sock.curve_server = True
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret

    def prove_strangers_are_rejected(self, endpoint: str) -> None:
        """Connect with a throwaway key; raise SecurityError unless the handshake is refused."""
        context = zmq.Context()
        probe = context.socket(zmq.DEALER)
        monitor = probe.get_monitor_socket()
        try:
            throwaway, probe.curve_secretkey = zmq.curve_keypair()
            probe.curve_publickey = self.policy.self_check_key = throwaway
            probe.curve_serverkey = self.public
            probe.connect(_reachable(endpoint))
            end = time.monotonic() + SELF_CHECK_TIMEOUT
            while time.monotonic() < end:
                if not monitor.poll(int((end - time.monotonic()) * 1000) + 1):
                    break
                event = monitor_events(monitor, 0)[0]
                if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    return
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    raise SecurityError("a client with an unknown key was let in: the authenticator does not work")
            raise SecurityError("could not verify within "
                                f"{SELF_CHECK_TIMEOUT:g} s that clients with unknown keys are rejected")
        finally:
            probe.disable_monitor()
            monitor.close(0)
            probe.close(0)
            context.term()

    def stop(self) -> None:
        self.authenticator.stop()


def _reachable(endpoint: str) -> str:
    """The address to connect to for a bound endpoint (a wildcard host is reached on loopback)."""
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://"):].rpartition(":")
        if host in ("*", "0.0.0.0"):
            return f"tcp://127.0.0.1:{port}"
        if host in ("[::]", "::"):
            return f"tcp://[::1]:{port}"
    return endpoint
