"""A joblib backend, so that scikit-learn's ``n_jobs`` (and everything else built on joblib) runs on
zmqexecutor's workers, on this machine or many::

    import joblib
    import zmqexecutor.joblib  # registers the backend "zmqexecutor"

    with joblib.parallel_config(backend="zmqexecutor", endpoints=["tcp://node1:5555", "tcp://node2:5555"]):
        search.fit(X, y)  # a GridSearchCV with n_jobs=-1

``parallel_config`` takes every ``ZMQExecutor`` option (no endpoints: local workers, owned by the
backend and stopped when the configuration is let go), or ``executor=ex`` to use an executor you
already have. ``n_jobs=-1`` means every slot of the connected workers. Runs in user threads (joblib's
dispatch, and the executor's callbacks).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Optional

from joblib import parallel_config as _parallel_config
from joblib._parallel_backends import AutoBatchingMixin, ParallelBackendBase
from joblib.parallel import register_parallel_backend

from ._executor import ZMQExecutor

__all__ = ["ZMQExecutorBackend", "NAME"]

#: The name the backend is registered under.
NAME = "zmqexecutor"

# While joblib asks how many jobs can run and no worker is ready yet (endpoints still connecting, a
# local worker starting), it waits this long for the first one.
FIRST_WORKER_WAIT = 30.0


def _sequentially(batch: Callable[[], Any], threads: int) -> Any:
    """Run a batch in a task process, with joblib calls inside it sequential and native thread pools
    (BLAS, OpenMP) held to ``threads``: the task processes are the parallelism already, and pools of
    their own in each would oversubscribe the worker's CPUs (joblib's loky backend limits them too)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # scikit-learn brings it; without it, the pools are left as they are
        with _parallel_config(backend="sequential"):
            return batch()
    with threadpool_limits(limits=threads), _parallel_config(backend="sequential"):
        return batch()


class ZMQExecutorBackend(AutoBatchingMixin, ParallelBackendBase):  # type: ignore[misc]
    """joblib's backend ``"zmqexecutor"``: batches of calls as tasks of one ``ZMQExecutor``.

    Args:
        executor: an executor to use (it stays yours: the backend never shuts it down).
        executor_options: otherwise, ``ZMQExecutor``'s arguments (``endpoints``, ``keys``, ``listen``,
            ...) for an executor the backend makes on first use and shuts down when it is let go.
    """

    supports_retrieve_callback = True
    supports_inner_max_num_threads = True
    default_n_jobs = -1

    def __init__(self, executor: Optional[ZMQExecutor] = None, nesting_level: Optional[int] = None,
                 inner_max_num_threads: Optional[int] = None, **executor_options: Any) -> None:
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads)
        if executor is not None and executor_options:
            raise TypeError("give the backend an executor or executor options, not both")
        if executor is not None and not isinstance(executor, ZMQExecutor):
            raise TypeError(f"executor must be a ZMQExecutor, not {type(executor).__name__}")
        self._given = executor
        self._options = executor_options
        self._executor: Optional[ZMQExecutor] = executor
        self._futures: weakref.WeakSet[Any] = weakref.WeakSet()

    def executor(self) -> ZMQExecutor:
        """The executor the batches go to (made now if the backend owns it and has none yet)."""
        if self._executor is None:
            self._executor = ZMQExecutor(**self._options)
            weakref.finalize(self, self._executor.shutdown, wait=False, cancel_futures=True)
        return self._executor

    def effective_n_jobs(self, n_jobs: Optional[int]) -> int:
        """``n_jobs``, with -1 every slot of the ready workers (-2 all but one, and so on)."""
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            n_jobs = self.default_n_jobs
        if n_jobs > 0:
            return n_jobs
        return max(self.slots() + 1 + n_jobs, 1)

    def slots(self) -> int:
        """The slots of the workers ready now; with none ready, after waiting for the first one."""
        executor = self.executor()
        slots = sum(w.slots for w in executor.workers() if w.state == "ready")
        if slots == 0:
            try:
                executor.wait_for_workers(1, timeout=FIRST_WORKER_WAIT)
            except TimeoutError:
                return 1  # nothing to count yet: tasks still go out, and wait for a worker
            slots = sum(w.slots for w in executor.workers() if w.state == "ready")
        return max(slots, 1)

    def configure(self, n_jobs: Optional[int] = 1, parallel: Any = None, prefer: Optional[str] = None,
                  require: Optional[str] = None, **backend_kwargs: Any) -> int:
        self.parallel = parallel
        return self.effective_n_jobs(n_jobs)

    def submit(self, func: Callable[[], Any], callback: Optional[Callable[[Any], None]] = None) -> Any:
        future = self.executor().submit(_sequentially, func, self.inner_max_num_threads or 1)
        self._futures.add(future)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def retrieve_result_callback(self, future: Any) -> Any:
        return future.result()

    def terminate(self) -> None:
        """The Parallel call is over: let go of it (it holds us too), so that once the configuration
        is let go, the executor the backend made is shut down at once, not at the next garbage
        collection."""
        self.parallel = None
        self.reset_batch_stats()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """An error or Ctrl-C stopped the Parallel call: its batches that wait are cancelled, and those
        running are stopped, on every worker."""
        executor = self._executor
        for future in list(self._futures):
            if not future.done() and executor is not None:
                executor.cancel(future, force=True)
        self._futures = weakref.WeakSet()

    def get_nested_backend(self) -> tuple[Any, Optional[int]]:
        from joblib._parallel_backends import SequentialBackend

        # A Parallel call inside one of ours, in this process (a callback, say): one at a time.
        nesting_level = 0 if self.nesting_level is None else self.nesting_level + 1
        return SequentialBackend(nesting_level=nesting_level), None


register_parallel_backend(NAME, ZMQExecutorBackend)
