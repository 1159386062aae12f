"""The ``zmqexecutor`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from . import __version__
from ._endpoints import is_loopback, parse


def _cpu_count() -> int:
    counter = getattr(os, "process_cpu_count", None) or os.cpu_count
    return counter() or 1


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zmqexecutor", description="Run Python functions on many machines.")
    parser.add_argument("--version", action="version", version=f"zmqexecutor {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    worker = commands.add_parser(
        "worker",
        help="run a worker that serves one endpoint with N task processes",
        description="Serve tasks from ZMQExecutor clients on one endpoint with N task processes.",
    )
    worker.add_argument("--bind", required=True, metavar="ENDPOINT",
                        help="endpoint to listen on: tcp://127.0.0.1:5555 or ipc:///path/to/socket")
    worker.add_argument("--processes", type=_positive_int, default=None, metavar="N",
                        help="task processes, i.e. tasks run at once (default: the CPU count)")
    worker.add_argument("--insecure", action="store_true",
                        help="allow binding a non-loopback TCP address without authentication: anyone "
                             "who can reach the port can run code as this user")
    worker.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default: INFO")
    worker.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def check_bind(endpoint: str, insecure: bool = False) -> Optional[str]:
    """Return why the worker must not bind ``endpoint``, or None when it may."""
    try:
        parsed = parse(endpoint, bind=True)
    except (TypeError, ValueError) as exc:
        return str(exc)
    if parsed.transport == "tcp" and not is_loopback(parsed.host) and not insecure:
        return (
            f"refusing to bind {endpoint}: a worker unpickles what it receives, so an open port is a "
            "remote shell. Until CurveZMQ authentication is available, bind a loopback address "
            "(tcp://127.0.0.1:PORT) and reach other hosts through an SSH tunnel "
            "(ssh -N -L PORT:127.0.0.1:PORT HOST), or pass --insecure on a network you trust entirely."
        )
    return None


def run_worker(args: argparse.Namespace) -> int:
    from ._worker import Supervisor

    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    log = logging.getLogger("zmqexecutor.worker")
    problem = check_bind(args.bind, args.insecure)
    if problem:
        log.error("%s", problem)
        return 2
    bound = parse(args.bind, bind=True)
    if args.insecure and bound.transport == "tcp" and not is_loopback(bound.host):
        log.warning("INSECURE: %s accepts tasks from anyone who can reach it, without authentication or "
                    "encryption; whoever connects can run any code as this user", args.bind)
    supervisor = Supervisor(args.bind, args.processes or _cpu_count(), parent_pid=args.parent_pid)
    return supervisor.run()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "worker":
        return run_worker(args)
    return 2  # pragma: no cover - argparse rejects unknown commands
