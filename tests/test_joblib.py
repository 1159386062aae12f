"""The joblib backend: joblib.Parallel and scikit-learn on real workers, local and remote."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest
from conftest import children_of, wait_until

joblib = pytest.importorskip("joblib")
sklearn = pytest.importorskip("sklearn")

from joblib import Parallel, delayed, parallel_config  # noqa: E402
from sklearn.datasets import make_classification  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.model_selection import GridSearchCV, cross_val_score  # noqa: E402

import zmqexecutor.joblib  # noqa: E402,F401  (registers the backend)
from zmqexecutor import RemoteTraceback, ZMQExecutor  # noqa: E402
from zmqexecutor.joblib import ZMQExecutorBackend  # noqa: E402

pytestmark = pytest.mark.timeout(180)


def square(x: int) -> int:
    return x * x


def where() -> int:
    return os.getpid()


def fails(x: int) -> int:
    raise ValueError(f"no {x}")


def nap_then(x: float) -> float:
    time.sleep(x)
    return x


def nested_backend(_: int) -> str:
    backend, _jobs = joblib.parallel.get_active_backend()
    inner = Parallel(n_jobs=4)(delayed(square)(i) for i in range(3))
    return f"{type(backend).__name__} {inner}"


def pid_scorer(estimator, X, y) -> float:
    return float(os.getpid())


@pytest.fixture
def two_workers(start_worker):
    return [start_worker(processes=2), start_worker(processes=2)]


def test_the_backend_is_registered_under_its_name() -> None:
    assert joblib.parallel.BACKENDS["zmqexecutor"] is ZMQExecutorBackend


def test_a_thousand_tiny_calls_run_on_local_workers_batched() -> None:
    with parallel_config(backend="zmqexecutor", max_workers=2):
        assert Parallel()(delayed(square)(i) for i in range(1000)) == [i * i for i in range(1000)]
        pids = set(Parallel(n_jobs=-1)(delayed(where)() for _ in range(20)))
    assert os.getpid() not in pids and 1 <= len(pids) <= 2


def test_scikit_learn_searches_and_scores_on_two_remote_workers_as_it_would_alone(two_workers) -> None:
    X, y = make_classification(n_samples=300, n_features=8, random_state=0)
    grid = {"C": [0.01, 0.1, 1.0, 10.0]}
    alone = GridSearchCV(LogisticRegression(max_iter=500), grid, cv=3).fit(X, y)
    scores_alone = cross_val_score(LogisticRegression(max_iter=500), X, y, cv=5)
    endpoints = [worker.endpoint for worker in two_workers]
    with parallel_config(backend="zmqexecutor", endpoints=endpoints):
        spread = GridSearchCV(LogisticRegression(max_iter=500), grid, cv=3, n_jobs=-1).fit(X, y)
        scores = cross_val_score(LogisticRegression(max_iter=500), X, y, cv=5, n_jobs=-1)
        pids = cross_val_score(LogisticRegression(max_iter=500), X, y, cv=5, n_jobs=-1, scoring=pid_scorer)
    assert spread.best_params_ == alone.best_params_
    assert list(spread.cv_results_["mean_test_score"]) == pytest.approx(list(alone.cv_results_["mean_test_score"]))
    assert list(scores) == pytest.approx(list(scores_alone))
    task_processes = children_of(two_workers[0].pid) | children_of(two_workers[1].pid)
    assert {int(pid) for pid in pids} <= task_processes


def test_n_jobs_minus_one_is_every_slot_and_an_executor_of_ones_own_stays_open(two_workers) -> None:
    with ZMQExecutor([worker.endpoint for worker in two_workers]) as ex:
        ex.wait_for_workers(2, timeout=30)
        backend = ZMQExecutorBackend(executor=ex)
        assert backend.effective_n_jobs(-1) == 4 and backend.effective_n_jobs(-2) == 3
        assert backend.effective_n_jobs(3) == 3
        with parallel_config(backend="zmqexecutor", executor=ex):
            assert Parallel(n_jobs=-1)(delayed(square)(i) for i in range(10)) == [i * i for i in range(10)]
        assert ex.submit(square, 3).result(timeout=30) == 9  # not shut down by the backend
    with pytest.raises(TypeError, match="not both"):
        ZMQExecutorBackend(executor=ex, max_workers=2)
    with pytest.raises(ValueError, match="n_jobs == 0"):
        ZMQExecutorBackend(executor=ex).effective_n_jobs(0)


def both_processes_serve(ex: ZMQExecutor) -> bool:
    # An error stops the failed call's running batches (their processes are killed and replaced, as
    # loky does); the unordered check below needs two processes at work.
    return len({f.result() for f in [ex.submit(nap_then_pid, 0.2) for _ in range(2)]}) == 2


def nap_then_pid(x: float) -> int:
    time.sleep(x)
    return os.getpid()


def test_errors_generators_timeouts_and_nesting_behave_as_with_joblibs_own_backends() -> None:
    with ZMQExecutor(max_workers=2) as ex, parallel_config(backend="zmqexecutor", executor=ex):
        with pytest.raises(ValueError, match="no [345]") as caught:
            Parallel(n_jobs=2)(delayed(fails)(i) for i in range(3, 6))
        assert isinstance(caught.value.__cause__, RemoteTraceback)
        assert wait_until(lambda: both_processes_serve(ex), timeout=60)
        unordered = Parallel(n_jobs=2, batch_size=1, return_as="generator_unordered")(
            delayed(nap_then)(x) for x in (1.0, 0.05))
        assert next(unordered) == 0.05 and list(unordered) == [1.0]
        lazy = Parallel(n_jobs=2, return_as="generator")(delayed(square)(i) for i in range(5))
        assert list(lazy) == [0, 1, 4, 9, 16]
        started = time.monotonic()
        with pytest.raises(multiprocessing.TimeoutError):  # joblib's own, whatever the backend
            Parallel(n_jobs=2, timeout=0.5)(delayed(nap_then)(x) for x in (30.0, 0.01))
        assert time.monotonic() - started < 10  # the runaway task was stopped, not waited for
        # Inside a task, joblib runs sequentially: the task process is the parallelism already.
        assert Parallel(n_jobs=2)(delayed(nested_backend)(0) for _ in range(2)) == ["SequentialBackend [0, 1, 4]"] * 2


def blas_threads(_: int) -> int:
    import numpy  # noqa: F401  (loads its BLAS)
    from threadpoolctl import threadpool_info

    return max((pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"), default=-1)


def test_native_thread_pools_in_a_task_are_held_to_one_thread_unless_asked() -> None:
    pytest.importorskip("threadpoolctl")
    with parallel_config(backend="zmqexecutor", max_workers=2):
        assert set(Parallel(n_jobs=2)(delayed(blas_threads)(i) for i in range(4))) == {1}
    with parallel_config(backend="zmqexecutor", max_workers=2, inner_max_num_threads=2):
        assert set(Parallel(n_jobs=2)(delayed(blas_threads)(i) for i in range(4))) == {2}
