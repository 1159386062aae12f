"""``ZMQExecutor``: the public class. It validates, pickles and queues; the engine does the rest.

Runs in user threads, in the client.
"""

from __future__ import annotations

import collections
import enum
import functools
import itertools
import logging
import os
import queue
import signal
import sys
import time
import weakref
from concurrent.futures import Executor, Future, _base
from typing import (
    Any,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    TypeVar,
    Union,
)

from ._client._caller import new_future
from ._client._connection import WorkerInfo
from ._client._handle import Handle
from ._client._local import LocalWorker
from ._client._reuse import MapDigests, RepeatedBuffers, Shared
from ._client._scheduler import Task, next_task_id
from ._client._settings import Settings
from ._wire import _features
from ._wire._curve import ClientKeys
from ._wire import _protocol as proto
from ._wire._endpoints import is_loopback, parse
from ._wire._errors import MessageTooLargeError, SecurityError
from ._wire._memory import parse_size
from ._wire._resources import check_amounts
from ._wire._serialize import CallEncoder, FunctionPickle
from ._worker._cpus import available_cpus

logger = logging.getLogger("zmqexecutor")

_T = TypeVar("_T")

#: How long, by default, a task waits for any worker to become reachable before it fails.
DEFAULT_CONNECT_TIMEOUT = 60.0

#: How long, by default, a connected worker may stay silent before it counts as lost. Heartbeats are
#: answered by the worker's supervisor, which runs no user code, so a long task never looks like silence.
DEFAULT_WORKER_TIMEOUT = proto.DEFAULT_SILENCE_TIMEOUT

#: How many times, by default, a task lost with its worker is sent to another one.
DEFAULT_MAX_RETRIES = 2

#: The largest task or result, in bytes, by default.
DEFAULT_MAX_MESSAGE_SIZE = proto.DEFAULT_MAX_MESSAGE_SIZE


def _refuse_plain_text_to_other_hosts(addresses: list[str]) -> None:
    for address in addresses:
        parsed = parse(address)
        if parsed.transport == "tcp" and not is_loopback(parsed.host):
            raise SecurityError(
                f"refusing to send tasks to {address} in plain text: anyone on the path could read them "
                "or answer with a result that runs code here. Pass keys=FOLDER (made by 'zmqexecutor "
                "keygen'), set $ZMQEXECUTOR_KEYS, or pass insecure=True on a network you trust entirely"
            )


def _check_int(name: str, value: object, minimum: int, too_small: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an integer")
    if value < minimum:
        raise ValueError(too_small)


def _check_seconds(name: str, value: object, *, none_ok: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number of seconds{' or None' if none_ok else ''}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0{' or None' if none_ok else ''}")


def _check_endpoints(endpoints: object) -> list[str]:
    if endpoints is None:
        return []
    if isinstance(endpoints, str):
        endpoints = [endpoints]
    if not isinstance(endpoints, Iterable):
        raise TypeError(f"endpoints must be a string, a list of strings or None, not {type(endpoints).__name__}")
    addresses = list(endpoints)
    if not addresses:
        raise ValueError("endpoints must not be empty; pass None to run on local worker processes")
    for address in addresses:
        parse(address)
    duplicates = sorted({a for a in addresses if addresses.count(a) > 1})
    if duplicates:
        raise ValueError(f"duplicate endpoints: {', '.join(duplicates)}")
    return addresses


def _check_arguments(*, listen: object, max_workers: object, initializer: object, max_tasks_per_child: object,
                     connect_timeout: object, worker_timeout: object, max_retries: object, max_message_size: object,
                     task_output: object, task_timeout: object, send_once: object) -> None:
    if listen is not None:
        if not isinstance(listen, str):
            raise TypeError(f"listen must be an address string like 'tcp://0.0.0.0:5555', not {type(listen).__name__}")
        parse(listen, bind=True)
    if max_workers is not None:
        _check_int("max_workers", max_workers, 1, "max_workers must be greater than 0")
    if initializer is not None and not callable(initializer):
        raise TypeError("initializer must be a callable")
    if max_tasks_per_child is not None:
        _check_int("max_tasks_per_child", max_tasks_per_child, 1, "max_tasks_per_child must be >= 1")
    if connect_timeout is not None:
        _check_seconds("connect_timeout", connect_timeout, none_ok=True)
    _check_seconds("worker_timeout", worker_timeout)
    _check_int("max_retries", max_retries, 0, "max_retries must be >= 0")
    _check_int("max_message_size", max_message_size, 1, "max_message_size must be >= 1")
    if task_output not in ("print", "log"):
        raise ValueError(f"task_output must be 'print' or 'log', not {task_output!r}")
    if task_timeout is not None:
        _check_seconds("task_timeout", task_timeout, none_ok=True)
    if not isinstance(send_once, bool):
        raise TypeError(f"send_once must be True or False, not {send_once!r}")


class _Inherit(enum.Enum):
    EXECUTORS = "the executor's"

    def __repr__(self) -> str:
        return "<the executor's>"


class _PerTask(NamedTuple):
    """What a task carries of its options."""

    task_timeout: Optional[float] = None
    needs: Optional[dict[str, float]] = None  # of a worker's resources


def _check_sizes(remote: bool, **sizes: object) -> dict[str, int]:
    """The sizes given for local workers (memory limits, cache), in bytes."""
    found = {}
    for name, size in sizes.items():
        if size is None:
            continue
        if remote:
            option = "--" + name.replace("_", "-")
            raise ValueError(f"{name} applies to the executor's own local workers; start remote workers "
                             f"with `zmqexecutor worker {option} SIZE`")
        if not isinstance(size, (int, str)) or isinstance(size, bool):
            raise TypeError(f"{name} must be a number of bytes or a size such as '2GiB', not {type(size).__name__}")
        found[name] = parse_size(size)
        if found[name] < 1 and name != "cache_size":
            raise ValueError(f"{name} must be at least 1 byte")
    return found


def _cancel_running(future: Future[Any]) -> bool:
    """Move a running future to cancelled, as ``Future.cancel`` does for a pending one (which it
    refuses for a running one). The stdlib offers no public way, so this follows its own steps, on
    the same private fields, unchanged from Python 3.8 to 3.14."""
    with future._condition:
        if future._state != _base.RUNNING:
            return False
        future._state = _base.CANCELLED_AND_NOTIFIED
        for waiter in future._waiters:
            waiter.add_cancelled(future)
        future._condition.notify_all()
    future._invoke_callbacks()  # type: ignore[attr-defined]
    return True


def _process_chunk(fn: Callable[..., _T], chunk: Sequence[tuple[Any, ...]]) -> list[_T]:
    return [fn(*args) for args in chunk]


def _chunks(chunksize: int, iterables: tuple[Iterable[Any], ...]) -> Iterator[tuple[tuple[Any, ...], ...]]:
    zipped = zip(*iterables)
    while chunk := tuple(itertools.islice(zipped, chunksize)):
        yield chunk


def _result_or_cancel(future: Future[_T], timeout: Optional[float] = None) -> _T:
    try:
        try:
            return future.result(timeout)
        finally:
            future.cancel()
    finally:
        del future  # do not keep the future alive through the traceback


class ZMQExecutor(Executor):
    """A ``concurrent.futures.Executor`` that runs calls on ZeroMQ workers, local or remote.

    With no ``endpoints`` it starts and owns ``max_workers`` task processes on this machine, like
    ``ProcessPoolExecutor``. With endpoints (``"tcp://host:port"`` or ``"ipc://path"``, one string or a
    list) it sends tasks round-robin to the ``zmqexecutor worker`` processes listening there.

    Callables and arguments are pickled with cloudpickle (lambdas, closures and functions defined in
    ``__main__`` work); large buffers travel as separate frames. Futures are standard
    ``concurrent.futures.Future`` objects.

    ``ZMQExecutor(4)`` is ``ZMQExecutor(max_workers=4)``, as ``ProcessPoolExecutor(4)`` is.
    With ``listen``, workers dial in to this client instead (clusters, NAT, workers that come and go).

    Args:
        endpoints: worker endpoints, or None for local workers owned by this executor; a number here
            is ``max_workers`` for local workers.
        max_workers: local task processes (default: CPU count); with endpoints, the most tasks this
            executor keeps running at once across all workers (default: all their slots).
        initializer: called as ``initializer(*initargs)`` in each task process before its first task
            from this executor; if it raises, the executor becomes broken.
        initargs: arguments for ``initializer``.
        max_tasks_per_child: a task process is replaced after running this many of this executor's
            tasks (default: never).
        connect_timeout: seconds a task waits while no worker is reachable before it fails with
            ``NoWorkersError``; None waits forever.
        worker_timeout: seconds a connected worker may stay silent (no answer to heartbeats) before
            it counts as lost and its tasks are retried; a closed connection counts at once.
        max_retries: how many times a task lost with its worker is sent again; a task lost more
            often fails with ``WorkerLostError``. 0 gives at-most-once execution.
        keys: the client's CurveZMQ key folder (``zmqexecutor keygen DIR`` makes ``DIR/client``):
            ``client.key_secret`` is this client's key pair, ``worker.key`` the worker key it pins.
            Defaults to ``$ZMQEXECUTOR_KEYS``, then, when every TCP endpoint is on this host, to this
            user's own key store (which workers started by this user on loopback use too). The
            embedded local workers need none.
        worker_keys: ``{endpoint: public key file or Z85 key}`` for workers with their own keys.
        insecure: plain-text, unauthenticated connections to every endpoint, other hosts included
            (without keys, loopback endpoints otherwise use this user's own key store).
        max_message_size: the largest task (and result) in bytes; a bigger task fails its future
            with ``MessageTooLargeError``.
        task_output: where what tasks print goes on this side: ``"print"`` writes each line to this
            process's stdout or stderr, tagged ``(pid=N)`` (``(pid=N, host=H)`` for a remote
            worker); ``"log"`` sends it to the ``zmqexecutor.task`` logger at INFO instead.
        task_timeout: seconds each task may run, counted from when its process starts it (time
            waiting in a queue does not count); past that the worker ends that process (SIGTERM, then
            SIGKILL 2 s later), starts another, and the future fails with ``TaskTimeoutError``, without
            a retry. None: no limit. ``options(task_timeout=...)`` sets it for some tasks only; with
            ``map(chunksize=N)`` it is the limit of each chunk.
        listen: an address to bind (``"tcp://0.0.0.0:5555"``; port 0 picks a free one, see
            ``listen_address``) for workers that dial in (``zmqexecutor worker --connect``, or a
            launcher: ``SSHWorkers``, ``SlurmWorkers``). Alongside ``endpoints`` or instead of them;
            without endpoints no local worker is started. Workers may join and leave at any time;
            ``wait_for_workers`` waits for some. Secured as the endpoints are, roles reversed: with
            ``keys``, this client is the CurveZMQ server and lets in the workers whose public key is
            ``worker.key`` in that folder or a ``worker_keys`` value; an address other hosts can
            reach needs keys or ``insecure=True``.
        send_once: a large buffer that every task carries (an array inside the mapped callable, or
            an argument object that comes again) goes to each worker (or local task process) once,
            named by its BLAKE3 digest afterwards. False sends everything with every task.
        max_memory_per_child: for local workers: a task process whose resident memory is above this
            after a task (a leak, a cache that only grows) is replaced before its next task, never
            during one. Bytes, or a size as people write it (``"512MiB"``, ``"2GiB"``, ``"1.5G"``).
            A remote worker takes it as ``zmqexecutor worker --max-memory-per-child``.
        memory_limit: for local workers: a task process that holds more than this while it runs a
            task is killed, that future fails with ``MemoryLimitError`` (not retried), and another
            process takes its place. A size as for ``max_memory_per_child``; remote workers take it as
            ``--memory-limit``.
        cache_size: for local workers: how much of the large buffers that ``send_once`` names the
            executor keeps in shared memory for its task processes (default 1 GiB, the least recently
            used let go first; 0 keeps none). A size as for ``max_memory_per_child``; remote workers
            take it as ``--cache-size``.
    """

    def __init__(
        self,
        endpoints: Union[str, Sequence[str], int, None] = None,
        max_workers: Optional[int] = None,
        *,
        initializer: Optional[Callable[..., object]] = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_child: Optional[int] = None,
        connect_timeout: Optional[float] = DEFAULT_CONNECT_TIMEOUT,
        worker_timeout: float = DEFAULT_WORKER_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        keys: Optional[Union[str, "os.PathLike[str]"]] = None,
        worker_keys: Optional[Mapping[str, Union[str, "os.PathLike[str]", bytes]]] = None,
        insecure: bool = False,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        task_output: str = "print",
        task_timeout: Optional[float] = None,
        listen: Optional[str] = None,
        send_once: bool = True,
        max_memory_per_child: Union[int, str, None] = None,
        memory_limit: Union[int, str, None] = None,
        cache_size: Union[int, str, None] = None,
    ) -> None:
        if isinstance(endpoints, int) and not isinstance(endpoints, bool):
            # The ProcessPoolExecutor(4) habit.
            if max_workers is not None:
                raise TypeError(f"ZMQExecutor({endpoints}, {max_workers!r}): a number as the first argument is "
                                "max_workers; give endpoints as strings")
            endpoints, max_workers = None, endpoints
        addresses = _check_endpoints(endpoints)
        _check_arguments(listen=listen, max_workers=max_workers, initializer=initializer,
                         max_tasks_per_child=max_tasks_per_child, connect_timeout=connect_timeout,
                         worker_timeout=worker_timeout, max_retries=max_retries,
                         max_message_size=max_message_size, task_output=task_output, task_timeout=task_timeout,
                         send_once=send_once)
        remote = bool(addresses) or listen is not None
        unsupported = None if remote else _features.local_workers_unsupported()
        if unsupported is not None:
            raise NotImplementedError(unsupported)
        self._per_task = _PerTask(task_timeout)
        self._security_args = (keys, worker_keys, insecure)  # for these endpoints and those added later
        listen_keys = None
        if listen is not None:
            from ._wire import _security  # key files are read only where keys are used

            listen_keys = _security.listen_keys(keys, worker_keys, listen, insecure=insecure)
        sizes = _check_sizes(remote, max_memory_per_child=max_memory_per_child, memory_limit=memory_limit,
                              cache_size=cache_size)
        if not remote and (keys is not None or worker_keys):
            raise ValueError("keys apply to remote endpoints; the embedded local workers are private already")
        client_keys = self._keys_for(addresses) if addresses else None
        settings = Settings(
            init_blob=proto.encode_initializer(initializer, tuple(initargs)),
            max_tasks_per_child=max_tasks_per_child,
            max_in_flight=max_workers if remote else None,
            connect_timeout=connect_timeout,
            worker_timeout=float(worker_timeout),
            max_retries=max_retries,
            max_message_size=max_message_size,
            keys=client_keys,
            task_output=task_output,
            listen=listen,
            listen_keys=listen_keys,
        )
        self._send_once = send_once
        self._max_message_size = max_message_size
        self._calls = CallEncoder()
        self._repeats = RepeatedBuffers()
        local_worker = None
        if remote:
            self._max_workers = max_workers
        else:
            self._max_workers = max_workers or available_cpus()  # as `zmqexecutor worker` counts them
            local_worker = LocalWorker(self._max_workers, **sizes)
            addresses = [local_worker.endpoint]
        self._remote = remote
        try:
            self._handle = Handle(self, addresses, settings, local_worker)
        except BaseException:
            if local_worker is not None:
                local_worker.stop()
            raise

    @property
    def listen_address(self) -> Optional[str]:
        """The address workers dial in to (``listen``, with the port filled in when it was 0), or None."""
        return self._handle.listen_address()

    def wait_for_workers(self, n: int = 1, timeout: Optional[float] = None) -> None:
        """Block until at least ``n`` workers are ready (bound or dialled in), as ``workers()`` counts them.

        Raises ``TimeoutError`` after ``timeout`` seconds (None: wait as long as it takes), and
        ``RuntimeError`` when the executor is shut down meanwhile.
        """
        _check_int("n", n, 1, "n must be >= 1")
        if timeout is not None:
            _check_seconds("timeout", timeout, none_ok=True)
        self._handle.wait_for_workers(n, timeout)

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The worker endpoints this executor sends tasks to (the local worker's, when embedded),
        ``add_endpoints`` and ``remove_endpoints`` included; workers that dialled in are not endpoints."""
        return tuple(self._handle.addresses)

    def add_endpoints(self, endpoints: Union[str, Sequence[str]]) -> None:
        """Start sending tasks to more bound workers as well (secured like the first ones: keys,
        ``worker_keys``, this user's key store on loopback, or ``insecure``)."""
        if not self._remote:
            raise RuntimeError("this executor runs on local workers of its own; give it endpoints or listen= "
                               "when you create it to add workers")
        addresses = _check_endpoints(endpoints)
        known = sorted(set(addresses) & set(self._handle.addresses))
        if known:
            raise ValueError(f"already an endpoint of this executor: {', '.join(known)}")
        self._handle.change_endpoints(addresses, [], self._keys_for(addresses))

    def _keys_for(self, addresses: list[str]) -> Optional[ClientKeys]:
        """The keys for these endpoints; refuses plain text to another host unless ``insecure``."""
        keys, worker_keys, insecure = self._security_args
        from ._wire import _security  # key files are read only where keys are used

        client_keys = _security.client_keys(keys, worker_keys, addresses, insecure=insecure)
        if client_keys is None and not insecure:
            _refuse_plain_text_to_other_hosts(addresses)
        return client_keys

    def remove_endpoints(self, endpoints: Union[str, Sequence[str]]) -> None:
        """Stop sending tasks to these workers: the tasks they are running finish there (and
        resolve their futures), then the connections close. Nothing is lost and nothing retried."""
        addresses = _check_endpoints(endpoints)
        unknown = sorted(set(addresses) - set(self._handle.addresses))
        if unknown:
            raise ValueError(f"not an endpoint of this executor: {', '.join(unknown)}")
        if not self._remote:
            raise RuntimeError("the local workers of this executor cannot be removed; shut it down instead")
        self._handle.change_endpoints([], addresses, None)

    def workers(self) -> tuple[WorkerInfo, ...]:
        """A read-only snapshot of every worker endpoint: state, slots, tasks in flight, completed, lost.

        ``state`` is ``"connecting"`` (no handshake yet, or lost and reconnecting), ``"ready"``,
        ``"draining"`` (asked to stop: it finishes its tasks, takes no more) or ``"incompatible"``
        (another version; ``error`` says why). The endpoints come first, in their order, then the
        workers that dialled in to ``listen`` (``endpoint`` is ``"HOST:PID via LISTEN"``), which are
        dropped from the list once they have left. Meant for dashboards and tests.
        """
        return self._handle.snapshot()

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Future[_T]:
        """Schedule ``fn(*args, **kwargs)`` on a worker and return a Future for its result.

        An argument or callable that cannot be pickled fails the returned future, not this call.
        """
        return self._submit(fn, args, kwargs, self._per_task)

    def share(self, obj: _T) -> Shared[_T]:
        """Pickle ``obj`` once and return a handle to pass to tasks in its place.

        Each task that gets the handle (as an argument, inside one, or inside its callable) gets the
        object, decoded once per task process; each worker receives its pickle once and keeps it as it
        keeps any large buffer (see ``send_once``). For big objects that are not one large buffer: a
        dict of millions of items, a fitted model. The handle stands for the object as it is now:
        share it again after changing it. Treat it as read-only in tasks: a task process keeps it
        for its later tasks.
        """
        handle = Shared(obj)
        if self._send_once:
            self._repeats.share(handle)
        return handle

    def cancel(self, future: Future[Any], *, force: bool = False) -> bool:
        """Cancel the task of ``future`` (one of this executor's): as ``future.cancel()``, which only
        cancels a task that has not started; with ``force``, a running one too.

        Forced, the future is cancelled at once (``cancelled()`` is True, ``result()`` raises
        ``CancelledError``, callbacks and ``wait`` see it) and the worker stops the task: it drops it
        if it is still queued there, or kills the process running it and starts another. Returns
        False only when the future was done already. A task sent ahead to a busy process (tiny tasks
        are) may still run; what it returns is dropped.
        """
        if future.cancel():
            return True
        if not force or not _cancel_running(future):
            return future.cancelled()
        self._handle.stop_task(future)
        return True

    def options(self, *, task_timeout: Union[float, None, _Inherit] = _Inherit.EXECUTORS,
                resources: Optional[Mapping[str, float]] = None) -> "TaskOptions":
        """This executor's ``submit`` and ``map`` for tasks with options of their own.

        ``ex.options(task_timeout=5).submit(fn, x)`` gives that one task 5 s to run (None: no limit),
        whatever the executor's ``task_timeout`` is (left out: the executor's).
        ``ex.options(resources={"gpu": 1})`` sends tasks only to workers that offer those resources
        (``zmqexecutor worker --resources gpu=2``), each holding its amounts while it runs, so a worker
        runs at most as many at once as its amounts allow; the rest wait here. The options object holds
        nothing else; make as many as you like.
        """
        if isinstance(task_timeout, _Inherit):
            task_timeout = self._per_task.task_timeout
        elif task_timeout is not None:
            _check_seconds("task_timeout", task_timeout, none_ok=True)
        needs = None if resources is None else check_amounts(resources, "resources") or None
        return TaskOptions(self, _PerTask(task_timeout, needs))

    def _submit(self, fn: Callable[..., _T], args: tuple[Any, ...], kwargs: dict[str, Any],
                per: "_PerTask", function: Optional[FunctionPickle] = None,
                per_map: Optional[MapDigests] = None) -> Future[_T]:
        self._handle.check_open()
        future: Future[_T] = new_future(None if self._remote else self._handle.engine.caller)
        # Arguments that come again are named for workers across a socket, and for local ones within
        # a map (hashed once for it): a submit would hash them each time, which costs more than the
        # local copy it saves.
        owners: Optional[list[Any]] = [] if self._send_once and (self._remote or per_map is not None) else None
        try:
            if function is None:
                function = self._calls.function_pickle(fn)
            frames = self._calls.encode(fn, args, kwargs, per.task_timeout, function, owners)
        except Exception as exc:
            future.set_exception(exc)
            return future
        if len(frames) == 1 and type(frames[0]) is bytes:  # a small task: nothing to keep, size at hand
            if len(frames[0]) > self._max_message_size:
                return self._too_large(future, len(frames[0]))
            self._handle.push(Task(next_task_id(), future, frames, len(frames[0]), needs=per.needs))
            return future
        size = sum(memoryview(f).nbytes for f in frames)
        if size > self._max_message_size:
            return self._too_large(future, size)
        # The function's buffers come last: a worker may keep them (sent once per worker), and the
        # arguments' that come again before them.
        first = len(frames) - len(function.buffers)
        keepable = tuple((first + i, d) for i, d in enumerate(function.digests)) if self._send_once else ()
        if owners:
            keepable = self._repeats.keepable(frames, owners, 1, per_map) + keepable
        self._handle.push(Task(next_task_id(), future, frames, size, keepable, first, per.needs))
        return future

    def _too_large(self, future: Future[_T], size: int) -> Future[_T]:
        future.set_exception(MessageTooLargeError(
            f"the task pickles to {size} bytes, more than max_message_size={self._max_message_size}"))
        return future

    def map(
        self,
        fn: Callable[..., _T],
        *iterables: Iterable[Any],
        timeout: Optional[float] = None,
        chunksize: int = 1,
        buffersize: Optional[int] = None,
        ordered: bool = True,
        progress: bool = False,
    ) -> Iterator[_T]:
        """Return an iterator equivalent to ``map(fn, *iterables)`` whose calls run on the workers.

        Args:
            timeout: seconds from this call after which ``__next__`` raises ``TimeoutError`` if the
                next result is not ready; None waits forever.
            chunksize: items sent together as one task, to amortize the round trip for small calls.
            buffersize: at most this many tasks (chunks) are submitted but not yet yielded; the
                iterables are read lazily as results are consumed. None submits everything at once.
            ordered: False yields each result as soon as its task is done, whatever the order of the
                inputs (``imap_unordered``); the items of one chunk stay together, in their order.
            progress: show the results taken so far on stderr as they are taken: a ``tqdm`` bar
                where tqdm is installed, else a line of text redrawn twice a second.
        """
        results = _map_calls(weakref.ref(self), fn, iterables, timeout, chunksize, buffersize, self._per_task,
                             ordered)
        return _with_progress(results, iterables) if progress else results

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks and release the workers once submitted tasks are done.

        Args:
            wait: block until every submitted task has finished and the local workers have stopped.
            cancel_futures: cancel tasks that have not been sent to a worker yet.
        """
        self._handle.shutdown(wait=wait, cancel_futures=cancel_futures)

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> Optional[bool]:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            # Ctrl-C: ProcessPoolExecutor's workers get the same SIGINT and die with the work; ours run
            # in a session of their own (or on other hosts), so stop this executor's work explicitly.
            logger.warning("KeyboardInterrupt: cancelling this executor's queued tasks and stopping its running ones")
            self._stop_workers(signal.SIGTERM)
        self.shutdown(wait=True)
        return None

    def terminate_workers(self) -> None:
        """Shut down at once and stop, with SIGTERM, the task processes running this executor's tasks.

        As ``ProcessPoolExecutor.terminate_workers`` (Python 3.14): queued tasks are cancelled, running
        ones fail with ``TaskCrashedError``, and the executor is shut down. Other clients' tasks on
        shared workers are not touched; the local worker, when embedded, is stopped.
        """
        self._stop_workers(signal.SIGTERM)

    def kill_workers(self) -> None:
        """Like ``terminate_workers``, with SIGKILL."""
        self._stop_workers(signal.SIGKILL)

    def _stop_workers(self, signum: int) -> None:
        self._handle.stop_workers(signum)


class TaskOptions:
    """``submit`` and ``map`` of one executor, for tasks with options of their own (``ZMQExecutor.options``).

    For example::

        quick = ex.options(task_timeout=5)
        futures = [quick.submit(probe, host) for host in hosts]
    """

    def __init__(self, executor: ZMQExecutor, per: "_PerTask") -> None:
        self._executor = executor
        self._per = per

    @property
    def task_timeout(self) -> Optional[float]:
        """Seconds each of these tasks may run; None: no limit."""
        return self._per.task_timeout

    @property
    def resources(self) -> Optional[dict[str, float]]:
        """What each of these tasks needs of a worker's resources; None: nothing."""
        return None if self._per.needs is None else dict(self._per.needs)

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Future[_T]:
        """As ``ZMQExecutor.submit``, with these options."""
        return self._executor._submit(fn, args, kwargs, self._per)

    def map(self, fn: Callable[..., _T], *iterables: Iterable[Any], timeout: Optional[float] = None,
            chunksize: int = 1, buffersize: Optional[int] = None, ordered: bool = True,
            progress: bool = False) -> Iterator[_T]:
        """As ``ZMQExecutor.map``, with these options (``timeout`` is still map's own: how long to
        wait for each next result)."""
        results = _map_calls(weakref.ref(self._executor), fn, iterables, timeout, chunksize, buffersize, self._per,
                             ordered)
        return _with_progress(results, iterables) if progress else results

    def __repr__(self) -> str:
        needs = "" if self._per.needs is None else f" resources={self.resources!r}"
        return f"<TaskOptions task_timeout={self.task_timeout!r}{needs} of {self._executor!r}>"


def _map_calls(executor_ref: "weakref.ref[ZMQExecutor]", fn: Callable[..., _T], iterables: tuple[Iterable[Any], ...],
               timeout: Optional[float], chunksize: int, buffersize: Optional[int],
               per: "_PerTask", ordered: bool = True) -> Iterator[_T]:
    """``map`` for an executor (held weakly, so that a forgotten iterator does not keep it alive)."""
    if chunksize < 1:
        raise ValueError("chunksize must be >= 1.")
    if buffersize is not None and not isinstance(buffersize, int):
        raise TypeError("buffersize must be an integer or None")
    if buffersize is not None and buffersize < 1:
        raise ValueError("buffersize must be None or > 0")
    if not isinstance(ordered, bool):
        raise TypeError(f"ordered must be True or False, not {ordered!r}")
    if chunksize == 1:
        return _results(executor_ref, fn, iter(zip(*iterables)), timeout, buffersize, per, ordered)
    chunked = _results(executor_ref, functools.partial(_process_chunk, fn),
                       ((c,) for c in _chunks(chunksize, iterables)), timeout, buffersize, per, ordered)
    return _flatten(chunked)


def _results(executor_ref: "weakref.ref[ZMQExecutor]", fn: Callable[..., _T], arguments: Iterator[tuple[Any, ...]],
             timeout: Optional[float], buffersize: Optional[int], per: "_PerTask",
             ordered: bool) -> Iterator[_T]:
    end_time = None if timeout is None else timeout + time.monotonic()
    executor = executor_ref()
    assert executor is not None  # the caller holds it
    # Pickled once for every task of the map (with an array inside it, that is most of the work);
    # if it cannot be pickled, each task's future fails as submit's would.
    try:
        function: Optional[FunctionPickle] = executor._calls.function_pickle(fn)
    except Exception:
        function = None
    per_map = MapDigests()  # an argument that comes again is hashed once in this map
    # Unordered, each future reports here when done, and results are taken in that order.
    done: Optional["queue.SimpleQueue[Future[_T]]"] = None if ordered else queue.SimpleQueue()

    def submit(executor: ZMQExecutor, args: tuple[Any, ...]) -> Future[_T]:
        future = executor._submit(fn, args, {}, per, function, per_map)
        if done is not None:
            future.add_done_callback(done.put)
        return future

    # Ordered, the futures in input order; unordered, a set (they leave it in any order).
    fs: Union[collections.deque[Future[_T]], set[Future[_T]]] = collections.deque() if ordered else set()
    add = fs.append if isinstance(fs, collections.deque) else fs.add
    if buffersize:
        arguments = iter(arguments)
        for args in itertools.islice(arguments, buffersize):
            add(submit(executor, args))
    else:
        for args in arguments:
            add(submit(executor, args))
    del executor

    def submit_next() -> None:
        executor = executor_ref()
        if executor is None:
            return
        args = next(arguments, None)
        if args is not None:
            add(submit(executor, args))

    def next_future() -> Future[_T]:
        if isinstance(fs, collections.deque):
            return fs.popleft()
        assert done is not None
        try:
            future = done.get(timeout=None if end_time is None else max(0.0, end_time - time.monotonic()))
        except queue.Empty:
            raise _base.TimeoutError from None
        fs.discard(future)
        return future

    def result_iterator() -> Iterator[_T]:
        try:
            while fs:
                if buffersize:
                    submit_next()
                future = next_future()
                if end_time is None:
                    yield _result_or_cancel(future)
                else:
                    yield _result_or_cancel(future, end_time - time.monotonic())
        finally:
            for future in fs:
                future.cancel()

    return result_iterator()


# Without tqdm, the progress line is redrawn at most this often (seconds): more often costs a write
# to the terminal per result of a fast map.
PROGRESS_REDRAW = 0.5


def _with_progress(results: Iterator[_T], iterables: tuple[Iterable[Any], ...]) -> Iterator[_T]:
    """``results``, counted on stderr as they are taken (map's ``progress=True``)."""
    sizes = [len(it) for it in iterables if hasattr(it, "__len__")]  # type: ignore[arg-type]
    total = min(sizes) if len(sizes) == len(iterables) and sizes else None
    try:
        from tqdm import tqdm  # type: ignore[import-untyped]
    except ImportError:
        return _counted(results, total)
    return iter(tqdm(results, total=total, unit="task"))


def _counted(results: Iterator[_T], total: Optional[int]) -> Iterator[_T]:
    started = drawn = time.monotonic()
    done = 0
    of = "" if total is None else f"/{total}"

    def draw() -> None:
        rate = done / max(time.monotonic() - started, 1e-9)
        sys.stderr.write(f"\r{done}{of} results, {rate:.0f}/s")
        sys.stderr.flush()

    try:
        for result in results:
            done += 1
            if time.monotonic() - drawn >= PROGRESS_REDRAW:
                draw()
                drawn = time.monotonic()
            yield result
    finally:
        draw()
        sys.stderr.write("\n")


def _flatten(chunks: Iterator[list[_T]]) -> Iterator[_T]:
    for chunk in chunks:
        chunk.reverse()
        while chunk:
            yield chunk.pop()
