"""The ``zmqexecutor`` command line.

Runs in the process of the ``zmqexecutor`` command (its main thread); ``worker`` becomes the supervisor.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from typing import Any, Optional, Sequence

from .._wire._endpoints import is_loopback, parse
from .._wire._memory import parse_size
from .._wire._resources import parse_resources
from .._wire._version import __version__


def size_in_bytes(text: str) -> int:
    """A size as people write it: ``512MiB``, ``2GiB``, ``1.5G`` (10**9), ``100k`` or plain bytes."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _resources(text: str) -> dict[str, float]:
    try:
        return parse_resources(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
    _add_worker(commands)
    _add_queries(commands)
    _add_top(commands)
    _add_keygen(commands)
    _add_launchers(commands)
    return parser


def _add_worker(commands: Any) -> None:
    worker = commands.add_parser(
        "worker",
        help="run a worker that serves one endpoint with N task processes",
        description="Serve tasks from ZMQExecutor clients on one endpoint with N task processes.",
    )
    where = worker.add_mutually_exclusive_group(required=True)
    where.add_argument("--bind", metavar="ENDPOINT",
                       help="endpoint to listen on: tcp://127.0.0.1:5555 or ipc:///path/to/socket; an address "
                            "other hosts can reach needs --keys (or, at your own risk, --insecure)")
    where.add_argument("--connect", metavar="ADDRESS",
                       help="dial in to the client listening there (ZMQExecutor(listen=...)) instead of "
                            "binding: tcp://client-host:5555; keeps dialling while the client is away. A "
                            "non-loopback address needs --keys (or --insecure)")
    worker.add_argument("--processes", type=_positive_int, default=None, metavar="N",
                        help="task processes, i.e. tasks run at once (default: the CPUs this process may use, "
                             "within any container or cgroup CPU quota)")
    worker.add_argument("--keys", metavar="DIR",
                        help="CurveZMQ key folder made by 'zmqexecutor keygen' (its worker/ part): "
                             "DIR/worker.key_secret is the worker's key, DIR/client.key the allowed client")
    worker.add_argument("--secret-key", metavar="FILE", help="the worker's secret key file (overrides --keys)")
    worker.add_argument("--allow", metavar="FILE_OR_DIR",
                        help="allowed client public keys: a .key file or a folder of them (overrides --keys)")
    worker.add_argument("--client-key", metavar="FILE",
                        help="with --connect: the client's public key to pin (overrides --keys' client.key)")
    worker.add_argument("--keys-from-stdin", action="store_true",
                        help="with --connect: read this worker's key pair and the client's public key from the "
                             "first line of standard input, as JSON {\"public\", \"secret\", \"client\"} "
                             "(what the SSH launcher sends: the keys touch no disk and no command line)")
    worker.add_argument("--exit-with-stdin", action="store_true",
                        help="drain and stop when standard input closes (a launcher's lifeline: its end, or "
                             "the end of its ssh connection, ends the worker as SIGTERM does)")
    worker.add_argument("--idle-timeout", type=float, default=None, metavar="SECONDS",
                        help="stop after this long without any client session (default: never)")
    worker.add_argument("--max-message-size", type=_positive_int, default=None, metavar="BYTES",
                        help="largest message frame accepted; a peer sending more is disconnected "
                             "(default: 1 GiB)")
    worker.add_argument("--cache-size", type=size_in_bytes, default=None, metavar="SIZE",
                        help="how much of the large buffers its clients send again and again (an array inside "
                             "a mapped function) it keeps, so that each crosses the network once; 0 keeps none "
                             "(default: 1GiB)")
    worker.add_argument("--resources", type=_resources, default=None, metavar="NAME=AMOUNT,...",
                        help="what this worker offers, by names and amounts of your own (gpu=2,mem=256): a task "
                             "that asks for some (ex.options(resources={'gpu': 1})) runs here only while they "
                             "are free")
    worker.add_argument("--max-memory-per-child", type=size_in_bytes, default=None, metavar="SIZE",
                        help="a task process whose resident memory is above SIZE after a task (a leak) is "
                             "replaced before its next task, never during one")
    worker.add_argument("--memory-limit", type=size_in_bytes, default=None, metavar="SIZE",
                        help="a task process that holds more than SIZE while it runs a task is killed, and that "
                             "task fails with MemoryLimitError; the process is replaced")
    worker.add_argument("--insecure", action="store_true",
                        help="allow binding a non-loopback TCP address without authentication: anyone "
                             "who can reach the port can run code as this user")
    worker.add_argument("--drain-timeout", type=float, default=None, metavar="SECONDS",
                        help="on SIGTERM (or 'zmqexecutor drain'), how long running tasks may take to finish "
                             "before they are stopped; queued ones go back to their clients at once "
                             "(default: 30)")
    worker.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default: INFO")
    worker.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                        help="serve Prometheus metrics at http://ADDRESS:PORT/metrics (0: a free port, logged); "
                             "needs prometheus_client: pip install 'zmqexecutor[metrics]'")
    worker.add_argument("--metrics-address", default="0.0.0.0", metavar="ADDRESS",
                        help="the address the metrics endpoint binds (default 0.0.0.0)")
    worker.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="json: one JSON object per line (time, level, message, host, pid, endpoint, client) "
                             "for log collectors; default: text")
    worker.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    # The embedded worker: task processes exchange tasks with the client at this ipc:// address.
    worker.add_argument("--direct", default=None, help=argparse.SUPPRESS)


def _add_queries(commands: Any) -> None:
    for name, text in (("status", "show each worker's versions, slots, load, counts, clients and uptime"),
                       ("ping", "check that each worker answers, and how fast"),
                       ("drain", "ask each worker to drain: take no more tasks, finish the running ones "
                                 "(queued ones go back to their clients), then exit")):
        command = commands.add_parser(name, help=text, description=text[0].upper() + text[1:] + "; exit "
                                      "status 0 only when every worker answers.")
        command.add_argument("endpoints", nargs="+", metavar="ENDPOINT")
        command.add_argument("--keys", metavar="DIR", help="the client key folder for secured workers "
                             "(default: $ZMQEXECUTOR_KEYS)")
        command.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each (default 5)")
        command.add_argument("--json", action="store_true",
                             help="one JSON document on stdout, for programs (schema in the README: "
                                  "'zmqexecutor status --json')")
        command.add_argument("--insecure", action="store_true",
                             help="talk plain text to workers on this host started with --insecure (without "
                                  "it, loopback TCP uses your own key store)")


def _add_top(commands: Any) -> None:
    text = "watch the workers live: slots, busy, queued, tasks/s, errors, memory (needs rich)"
    top = commands.add_parser("top", help=text, description=text[0].upper() + text[1:] + "; Ctrl-C quits.")
    top.add_argument("endpoints", nargs="+", metavar="ENDPOINT")
    top.add_argument("--keys", metavar="DIR", help="the client key folder for secured workers (default: "
                     "$ZMQEXECUTOR_KEYS)")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between redraws (default 1)")
    top.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for each worker (default 2)")
    top.add_argument("--insecure", action="store_true", help="as for zmqexecutor status")


def run_top(args: argparse.Namespace) -> int:
    try:
        import rich  # noqa: F401
    except ImportError:
        sys.stderr.write("zmqexecutor top needs the rich library: pip install 'zmqexecutor[top]'\n")
        return 2
    keys = _query_keys(args)
    if isinstance(keys, int):
        return keys
    from ._top import run

    return run(args.endpoints, keys, args.interval, args.timeout)


def _query_keys(args: argparse.Namespace) -> Any:
    """The client keys for asking ``args.endpoints`` (None: plain), or the exit status of a usage
    error, said on stderr."""
    from .._wire._errors import SecurityError
    from .._wire._security import client_keys

    for endpoint in args.endpoints:
        try:
            parse(endpoint)
        except (TypeError, ValueError) as exc:
            sys.stderr.write(f"zmqexecutor {args.command}: {exc}\n")
            return 2
    try:
        return client_keys(args.keys, None, args.endpoints, insecure=args.insecure)
    except SecurityError as exc:
        sys.stderr.write(f"zmqexecutor {args.command}: {exc}\n")
        return 2


def _add_keygen(commands: Any) -> None:
    keygen = commands.add_parser(
        "keygen",
        help="make CurveZMQ key pairs for a worker and a client",
        description="Write DIR/worker/ (for worker hosts) and DIR/client/ (for the client), each holding "
                    "only its own secret key, readable by you alone.",
    )
    keygen.add_argument("dir", metavar="DIR")
    keygen.add_argument("--force", action="store_true", help="replace existing keys")


def _add_launchers(commands: Any) -> None:
    ssh = commands.add_parser(
        "ssh", help="start dial-in workers on hosts over SSH; stop them on Ctrl-C",
        description="Start 'zmqexecutor worker --connect ADDRESS' on each host with your ssh client and "
                    "configuration (keys go over the connection, not on a command line), until Ctrl-C or "
                    "SIGTERM; exit when every worker has ended.")
    ssh.add_argument("hosts", nargs="+", metavar="HOST")
    ssh.add_argument("--ssh-option", action="append", default=[], metavar="ARG",
                     help="an argument for ssh, put before the host; once per argument (a port: -p, then 2222)")
    slurm = commands.add_parser(
        "slurm", help="run dial-in workers as a Slurm job; cancel it on Ctrl-C",
        description="Submit a job of one 'zmqexecutor worker --connect ADDRESS' per node (sbatch, srun), "
                    "wait until it runs, and cancel it on Ctrl-C or SIGTERM; exit when the job has ended.")
    slurm.add_argument("--nodes", type=_positive_int, default=1, metavar="N", help="nodes, one worker each")
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--time", dest="time_limit", default=None, metavar="LIMIT", help="as sbatch --time")
    slurm.add_argument("--account", default=None)
    slurm.add_argument("--sbatch-line", action="append", default=[], metavar="OPTION",
                       help="another #SBATCH option such as mem=64G, once per option")
    slurm.add_argument("--folder", default=None, metavar="DIR",
                       help="where the job's keys and output go (seen by the nodes; default ~/.zmqexecutor/jobs)")
    for command in (ssh, slurm):
        command.add_argument("--connect", required=True, metavar="ADDRESS",
                             help="what the workers dial: the client's ZMQExecutor(listen=...) address")
        command.add_argument("--keys", metavar="DIR",
                             help="a 'zmqexecutor keygen' folder (the client uses DIR/client); default: keys "
                                  "made for this run, printed, removed at the end")
        command.add_argument("--resources", type=_resources, default=None, metavar="NAME=AMOUNT,...",
                             help="what each worker offers, as zmqexecutor worker --resources")
        command.add_argument("--processes", type=_positive_int, default=None, metavar="N",
                             help="task processes per worker (default: the CPUs each has)")
        command.add_argument("--python", default=None, help="the interpreter on the workers' hosts")
        command.add_argument("--start-timeout", type=float, default=None, metavar="SECONDS")


def check_bind(endpoint: str, insecure: bool = False, secured: bool = False) -> Optional[str]:
    """Return why the worker must not bind ``endpoint``, or None when it may."""
    try:
        parsed = parse(endpoint, bind=True)
    except (TypeError, ValueError) as exc:
        return str(exc)
    if parsed.transport == "tcp" and not is_loopback(parsed.host) and not insecure and not secured:
        return (
            f"refusing to bind {endpoint} without keys: a worker unpickles what it receives, so an open "
            "port is a remote shell. Secure it with CurveZMQ (zmqexecutor keygen DIR, then --keys "
            "DIR/worker), or bind a loopback address (secured by your own key store) and reach it through "
            "an SSH tunnel (ssh -N -L PORT:127.0.0.1:PORT HOST, with the store copied to the client), or "
            "pass --insecure on a network you trust entirely."
        )
    return None


def run_worker(args: argparse.Namespace) -> int:
    from ._logs import configure

    configure(args.log_level, args.log_format, args.bind or args.connect)
    log = logging.getLogger("zmqexecutor.worker")
    from .._wire._features import local_workers_unsupported
    unsupported = local_workers_unsupported()
    if unsupported is not None:
        log.error("cannot run a worker here: %s", unsupported)
        return 2
    if args.keys:
        from pathlib import Path

        from .._wire._errors import SecurityError
        from .._wire._security import check_key_folder
        try:
            check_key_folder(Path(args.keys).expanduser(), "worker")
        except SecurityError as exc:
            log.error("%s (--keys %s/worker)", exc, args.keys.rstrip("/"))
            return 2
    if args.connect is not None:
        return run_dialling_worker(args, log)
    secret_key = args.secret_key or (os.path.join(args.keys, "worker.key_secret") if args.keys else None)
    allow = args.allow or (os.path.join(args.keys, "client.key") if args.keys else None)
    bound = parse(args.bind, bind=True) if check_bind(args.bind, True) is None else None
    on_loopback_tcp = bound is not None and bound.transport == "tcp" and is_loopback(bound.host)
    if secret_key is None and allow is None and on_loopback_tcp and not args.insecure:
        # Other users of this host are strangers too: by default, this user's own keys guard the port.
        from .._wire._security import user_key_store
        store = user_key_store(create=True) / "worker"
        secret_key, allow = str(store / "worker.key_secret"), str(store / "client.key")
        log.info("securing %s with this user's key store %s (clients of this user find it too)",
                 args.bind, store.parent)
    if (secret_key is None) != (allow is None):
        log.error("a secured worker needs both its secret key and the allowed client keys (--keys, or "
                  "--secret-key and --allow)")
        return 2
    problem = check_bind(args.bind, args.insecure, secured=secret_key is not None)
    if problem:
        log.error("%s", problem)
        return 2
    bound = parse(args.bind, bind=True)
    if secret_key is None and args.insecure and bound.transport == "tcp":
        whom = "any other user of this host" if is_loopback(bound.host) else "anyone who can reach it"
        log.warning("INSECURE: %s accepts tasks from %s, without authentication or encryption; whoever "
                    "connects can run any code as this user", args.bind, whom)
    return run_supervisor(args, bind=args.bind, parent_pid=args.parent_pid, secret_key_file=secret_key,
                          allow=allow, direct=args.direct)


def run_dialling_worker(args: argparse.Namespace, log: logging.Logger) -> int:
    from .._wire._errors import SecurityError
    from .._wire._security import dial_keys

    try:
        parsed = parse(args.connect)
    except (TypeError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    try:
        keys = dial_keys(args.connect, folder=args.keys, secret_key=args.secret_key, client_key=args.client_key,
                         from_stdin=args.keys_from_stdin, insecure=args.insecure)
    except SecurityError as exc:
        log.error("%s", exc)
        return 2
    if keys is None and parsed.transport == "tcp" and not args.insecure:
        log.error("refusing to dial %s without keys: a worker unpickles what it receives, so whoever answers "
                  "at that address could run code here. Pass --keys DIR/worker (zmqexecutor keygen DIR), "
                  "or --insecure on a network you trust entirely.", args.connect)
        return 2
    if keys is None and parsed.transport == "tcp":
        log.warning("INSECURE: taking tasks from whoever answers at %s, without authentication or encryption",
                    args.connect)
    return run_supervisor(args, bind=None, connect=args.connect, dial_keys=keys)


def run_supervisor(args: argparse.Namespace, *, bind: Optional[str], **where: Any) -> int:
    """Run a worker with the options ``--bind`` and ``--connect`` share; ``where`` says the rest."""
    from .._wire._protocol import DEFAULT_MAX_MESSAGE_SIZE
    from .._worker._cpus import available_cpus
    from .._worker._keep import DEFAULT_KEEP_BYTES
    from .._worker._supervisor import DEFAULT_DRAIN_TIMEOUT, Supervisor

    supervisor = Supervisor(
        bind, args.processes or available_cpus(), **where,
        max_message_size=args.max_message_size or DEFAULT_MAX_MESSAGE_SIZE,
        drain_timeout=DEFAULT_DRAIN_TIMEOUT if args.drain_timeout is None else args.drain_timeout,
        idle_timeout=args.idle_timeout, exit_with_stdin=args.exit_with_stdin,
        keep_bytes=DEFAULT_KEEP_BYTES if args.cache_size is None else args.cache_size,
        memory_per_child=args.max_memory_per_child, memory_limit=args.memory_limit,
        resources=args.resources,
    )
    if args.metrics_port is not None:
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            logging.getLogger("zmqexecutor.worker").error(
                "--metrics-port needs the prometheus_client library: pip install 'zmqexecutor[metrics]'")
            return 2
        supervisor.when_ready = functools.partial(_serve_metrics, supervisor, args.metrics_port, args.metrics_address)
    return supervisor.run()


def _serve_metrics(supervisor: Any, port: int, address: str) -> None:
    from .._worker._router import GiveUp
    from ._metrics import serve

    try:
        bound = serve(supervisor, port, address)
    except OSError as exc:
        # As for a worker endpoint that cannot be bound: one line and exit status 1, not a traceback.
        raise GiveUp(f"cannot serve metrics on {address}:{port}: {exc.strerror or exc}") from None
    logging.getLogger("zmqexecutor.worker").info("Prometheus metrics at http://%s:%d/metrics", address, bound)


def run_status(args: argparse.Namespace) -> int:
    from .._wire._protocol import local_versions, version_mismatch
    from ._status import STATUS_SCHEMA_VERSION, duration_text, query, worker_document

    keys = _query_keys(args)
    if isinstance(keys, int):
        return keys
    answered = 0
    documented = []
    for endpoint in args.endpoints:
        status, seconds, problem = query(endpoint, keys, args.timeout, drain=args.command == "drain")
        # A worker that answers but that this Python cannot use is not "ok".
        mismatch = None if status is None else version_mismatch(local_versions(), status, us="this client",
                                                                   them=f"worker {endpoint}")
        answered += status is not None and mismatch is None
        if args.json:
            documented.append(worker_document(endpoint, status, seconds, problem or mismatch))
            continue
        if status is None:
            sys.stdout.write(f"{endpoint}  unreachable: {problem}\n")
            continue
        verdict = "ok" if mismatch is None else f"INCOMPATIBLE ({mismatch})"
        if args.command == "ping":
            sys.stdout.write(f"{endpoint}  {verdict}  {seconds * 1000:.1f} ms\n")
            continue
        if args.command == "drain":
            sys.stdout.write(f"{endpoint}  draining: {status.get('busy')} task(s) running\n" if status.get("draining") else
                             f"{endpoint}  cannot drain (an embedded worker stops with its executor)\n")
            continue
        sys.stdout.write(
            f"{endpoint}  {verdict}  zmqexecutor {status.get('zmqexecutor')}, Python {status.get('python')}, "
            f"cloudpickle {status.get('cloudpickle')}, security {status.get('security')}\n"
            f"    host {status.get('host')} pid {status.get('pid')} instance {status.get('instance')} "
            f"up {duration_text(status.get('uptime'))}\n"
            f"    slots {status.get('slots')}  busy {status.get('busy')}  queued {status.get('queued')}  "
            f"clients {status.get('clients')}{'  DRAINING' if status.get('draining') else ''}\n"
            f"    tasks done {status.get('done')}  failed {status.get('failed')}  crashed {status.get('crashed')}  "
            f"timed out {status.get('timed_out', 0)}  killed on request {status.get('cancelled', 0)}\n"
            f"    kept {_mib(status.get('kept_bytes'))} of {_mib(status.get('keep_bytes'))} MiB for its clients: "
            f"{status.get('kept_received', 0)} buffer(s) received, {status.get('kept_reused', 0)} reused, "
            f"{status.get('kept_missing', 0)} missing, {status.get('kept_refused', 0)} refused\n"
        )
        offered = status.get("resources")
        if isinstance(offered, dict) and offered:
            in_use = status.get("resources_in_use")
            in_use = in_use if isinstance(in_use, dict) else {}
            sys.stdout.write("    resources " + "  ".join(
                f"{name} {in_use.get(name, 0):g} of {amount:g} in use" for name, amount in sorted(offered.items())) + "\n")
    if args.json:
        sys.stdout.write(json.dumps({"schema_version": STATUS_SCHEMA_VERSION, "command": args.command,
                                     "workers": documented}, indent=2) + "\n")
    return 0 if answered == len(args.endpoints) else 1


def _mib(size: object) -> str:
    return f"{size / (1 << 20):.1f}" if isinstance(size, (int, float)) else "?"


def run_keygen(args: argparse.Namespace) -> int:
    from .._wire._errors import SecurityError
    from .._wire._security import keygen

    try:
        folders = keygen(args.dir, force=args.force)
    except SecurityError as exc:
        sys.stderr.write(f"zmqexecutor keygen: {exc}\n")
        return 1
    sys.stdout.write(
        f"worker keys: {folders['worker']}  (copy to each worker host; run: zmqexecutor worker --keys DIR)\n"
        f"client keys: {folders['client']}  (keep on the client; ZMQExecutor(..., keys=DIR) or "
        "ZMQEXECUTOR_KEYS=DIR)\n"
    )
    return 0


def run_launcher(args: argparse.Namespace) -> int:
    import signal
    import time

    from .._wire._errors import LaunchError
    from ._launchers import SlurmWorkers, SSHWorkers

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    common: dict[str, object] = dict(address=args.connect, keys=args.keys, processes=args.processes,
                                     resources=args.resources)
    if args.python:
        common["python"] = args.python
    if args.start_timeout:
        common["start_timeout"] = args.start_timeout
    launcher: "SSHWorkers | SlurmWorkers"
    if args.command == "ssh":
        launcher = SSHWorkers(args.hosts, ssh_options=args.ssh_option, **common)  # type: ignore[arg-type]
    else:
        launcher = SlurmWorkers(args.nodes, partition=args.partition, time_limit=args.time_limit,
                                account=args.account, sbatch_lines=args.sbatch_line, folder=args.folder,
                                **common)  # type: ignore[arg-type]
    stop = []
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        launcher.start()
    except LaunchError as exc:
        sys.stderr.write(f"zmqexecutor {args.command}: {exc}\n")
        return 1
    try:
        what = f"job {launcher.job_id}" if isinstance(launcher, SlurmWorkers) else f"{len(args.hosts)} worker(s)"
        sys.stdout.write(f"{what} dialling {launcher.address}; the client's keys: {launcher.keys} "
                         f"(ZMQExecutor(listen=..., keys=...)); Ctrl-C stops\n")
        sys.stdout.flush()
        while not stop:
            if isinstance(launcher, SlurmWorkers):
                if not launcher.state()[0]:
                    sys.stderr.write(f"zmqexecutor slurm: job {launcher.job_id} has ended:\n{launcher.output_tail()}\n")
                    launcher.job_id = None
                    return 1
            elif len(launcher.failed()) == len(args.hosts):
                sys.stderr.write("zmqexecutor ssh: every worker has ended\n")
                return 1
            time.sleep(1.0)
        return 0
    finally:
        launcher.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "worker":
        return run_worker(args)
    if args.command == "keygen":
        return run_keygen(args)
    if args.command == "top":
        return run_top(args)
    if args.command in ("status", "ping", "drain"):
        return run_status(args)
    if args.command in ("ssh", "slurm"):
        return run_launcher(args)
    return 2  # pragma: no cover - argparse rejects unknown commands
