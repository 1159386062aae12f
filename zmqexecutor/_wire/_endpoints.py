"""Parsing and checking ZeroMQ endpoint strings.

Runs in any process and thread (no state).
"""

from __future__ import annotations

import ipaddress
from typing import Any, NamedTuple


class Endpoint(NamedTuple):
    transport: str
    host: str
    port: str
    path: str


def parse(endpoint: object, *, bind: bool = False) -> Endpoint:
    """Split ``tcp://host:port`` or ``ipc://path``; raise ValueError naming the endpoint if malformed."""
    if not isinstance(endpoint, str):
        raise TypeError(f"an endpoint must be a string like 'tcp://host:5555', not {type(endpoint).__name__}")
    transport, sep, rest = endpoint.partition("://")
    if not sep or not rest:
        raise ValueError(f"malformed endpoint {endpoint!r}: expected 'tcp://host:port' or 'ipc://path'")
    if transport == "ipc":
        return Endpoint("ipc", "", "", rest)
    if transport != "tcp":
        raise ValueError(f"unsupported transport in endpoint {endpoint!r}: use tcp:// or ipc://")
    host, colon, port = rest.rpartition(":")
    if not colon or not host:
        raise ValueError(f"malformed endpoint {endpoint!r}: expected 'tcp://host:port'")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or any(c.isspace() for c in host) or "/" in host:
        raise ValueError(f"malformed host in endpoint {endpoint!r}")
    if bind and port in ("*", "0"):
        return Endpoint("tcp", host, port, "")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"malformed port in endpoint {endpoint!r}: expected 1-65535")
    if not bind and host == "*":
        raise ValueError(f"cannot connect to wildcard host in endpoint {endpoint!r}")
    return Endpoint("tcp", host, port, "")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def probe(endpoint: str, timeout: float) -> str:
    """Why ``endpoint`` may not answer, in words, from a plain connection attempt (blocks up to about
    ``timeout``; DNS lookups may take longer)."""
    import os
    import socket

    where = parse(endpoint)
    address: Any
    if where.transport == "ipc":
        if not os.path.exists(where.path):
            return f"no socket file at {where.path} (no worker is bound there)"
        family, address = socket.AF_UNIX, where.path
    else:
        try:
            infos = socket.getaddrinfo(where.host, int(where.port), type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            return f"cannot resolve host {where.host!r} ({exc.strerror})"
        family, address = infos[0][0], infos[0][4]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except ConnectionRefusedError:
        return "connection refused (nothing listens there)"
    except (socket.timeout, TimeoutError):
        return f"no answer within {timeout:g} s (the host is down, or a firewall drops the packets)"
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        sock.close()
    return "it accepts connections, but no zmqexecutor worker answered there"
