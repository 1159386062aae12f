"""The benchmark suite runs end to end (its --quick smoke); no test here asserts a speed."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
from conftest import ROOT

# Run once, on the default interpreter; .ci/run skips these on the other Pythons (see pyproject.toml).
pytestmark = pytest.mark.slow


@pytest.mark.timeout(600)
def test_the_quick_suite_writes_a_report(tmp_path) -> None:
    out = tmp_path / "results"
    key_folders = set(glob.glob(os.path.join(tempfile.gettempdir(), "zmqexecutor-bench-*")))
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--systems", "process,zmq-ipc,zmq-tcp,zmq-curve,pyzmq-floor,ray",
         "--workloads", "throughput,latency,payload,payload-again,startup,scaling", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=580,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    # A progress line per measurement, counted; a missing peer is named once, not per workload.
    assert re.search(r"^\[1/\d+\] ", run.stdout, re.MULTILINE) and "latency        zmq-ipc" in run.stdout
    progress = [line for line in run.stdout.splitlines() if line.startswith("[")]
    assert sum("ray is not installed" in line for line in progress) <= 1
    # zmq-curve made its keys in a folder of its own and removed it, secrets and all.
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "zmqexecutor-bench-*"))) == key_folders
    report = json.loads((out / "results.json").read_text())
    results = report["results"]
    assert set(results) == {"throughput", "latency", "payload", "payload-again", "startup", "scaling-1", "scaling-4"}
    for workload in ("throughput", "latency", "payload", "payload-again", "startup"):
        for system in ("process", "zmq-ipc", "zmq-tcp"):
            (run_result,) = results[workload][system]
            assert run_result["value"] > 0, (workload, system, run_result)
    assert results["payload"]["pyzmq-floor"][0]["value"] > 0
    assert results["payload-again"]["pyzmq-floor"][0]["value"] > 0
    assert set(results["scaling-4"]) == {"process", "zmq-tcp"}
    table = (out / "results.md").read_text()
    assert "| zmq-ipc |" in table and "vs process" in table and "Machine:" in table
    try:
        import ray  # noqa: F401
    except ImportError:
        assert "| ray | skipped: ray is not installed" in table
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        assert (out / "workloads.png").stat().st_size > 1000
        assert (out / "scaling.png").stat().st_size > 1000


@pytest.mark.timeout(300)
def test_the_overhead_profile_accounts_for_every_process_over_tcp() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.profile_overhead", "--system", "zmq-tcp", "--tasks", "2000", "--rounds", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=280, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    spent = dict(re.findall(r"^  (client|supervisor|task process \d|total) +([\d.]+) us CPU per task", run.stdout,
                            re.MULTILINE))
    assert set(spent) == {"client", "supervisor", "task process 0", "task process 1", "total"}, run.stdout
    # A relayed worker's supervisor does work for every task (the embedded one does not).
    assert float(spent["supervisor"]) > 0 and float(spent["client"]) > 0
    assert "zmqexecutor-io" in run.stdout and "MainThread" in run.stdout


@pytest.mark.timeout(300)
def test_the_overhead_profile_of_lone_tasks_compares_with_process_pool_executor() -> None:
    # zmq-ipc with the default number of tasks (3000 round trips), so that the default is run too.
    for system, processes, tasks in (("process", {"worker 0", "worker 1"}, ["--tasks", "300"]),
                                     ("zmq-ipc", {"supervisor", "task process 0", "task process 1"}, [])):
        run = subprocess.run(
            [sys.executable, "-m", "benchmarks.profile_overhead", "--system", system, "--lone", *tasks,
             "--rounds", "1"],
            cwd=ROOT, capture_output=True, text=True, timeout=140, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        assert run.returncode == 0, run.stdout + run.stderr
        count = tasks[1] if tasks else "3000"
        assert re.search(rf"{count} no-op tasks one at a time in [\d.]+ s: \d+ us per round trip", run.stdout), \
            run.stdout
        spent = dict(re.findall(r"^  (\S.*?) +([\d.]+) us CPU per task", run.stdout, re.MULTILINE))
        assert set(spent) == {"client", "total", *processes}, run.stdout
        assert float(spent["client"]) > 0 and "at most" not in run.stdout
        if system == "zmq-ipc":  # 300 round trips of ProcessPoolExecutor take about one 10 ms clock tick
            assert "MainThread" in run.stdout  # of CPU, which /proc may count to another of its threads


@pytest.mark.timeout(300)
def test_a_run_leaves_no_report_of_an_earlier_run_in_its_folder(tmp_path) -> None:
    for name in ("summary.rst", "scaling.png", "results.md"):
        (tmp_path / name).write_text("an earlier run's")
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--repeats", "1", "--systems", "process", "--workloads",
         "latency", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=280, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert not (tmp_path / "scaling.png").exists()  # this run measured no scaling
    assert "an earlier run's" not in (tmp_path / "summary.rst").read_text()
    assert "| process |" in (tmp_path / "results.md").read_text()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", [[], ["--dial"]], ids=["bound", "dial-in"])
def test_a_simulated_fleet_serves_a_real_client_and_reports_both_sides(how, keys) -> None:
    # 50 workers of 2 slots answering 1 ms tasks; with keys, over CurveZMQ.
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.fleet", "measure", "--workers", "50", "--slots", "2", "--task-ms", "1",
         "--tasks", "2000", "--idle", "0.5", "--curve", str(keys), *how],
        cwd=ROOT, capture_output=True, text=True, timeout=280, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["workers"] == 50 and result["curve"] and result["dial"] == bool(how)
    assert 0 < result["connected_s"] <= result["first_result_s"] < 60
    # 2,000 tasks of 1 ms on 100 slots cannot take less than 20 ms; the fleet answered each once.
    assert 0 < result["tasks_per_s"] < 100_000
    assert result["fleet_answered"] == 2001  # the burst and the first task, each once
    assert result["client_us_per_task"] > 0 and result["fleet_us_per_task"] > 0
    assert result["idle_core_percent"] >= 0 and result["client_kib_per_worker"] > 0
