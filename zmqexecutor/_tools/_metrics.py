"""A worker's Prometheus metrics (``zmqexecutor worker --metrics-port PORT``), served over HTTP with
the ``prometheus_client`` library (``pip install 'zmqexecutor[metrics]'``).

Runs in the worker's supervisor process: its HTTP thread reads the snapshot the loop thread renews
(``Supervisor.publish_metrics``), and never the loop's own state.
"""

from __future__ import annotations

from typing import Any, Iterator

PREFIX = "zmqexecutor"

# status field -> the outcome label of zmqexecutor_tasks_total
_OUTCOMES = {"done": "done", "failed": "failed", "crashed": "crashed", "timed_out": "timed_out",
             "cancelled": "killed_on_request"}


class WorkerCollector:
    """The metrics of one worker, from its supervisor's latest snapshot, at each scrape."""

    def __init__(self, supervisor: Any) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        status = self.supervisor.snapshot
        if status is None:
            return
        tasks = CounterMetricFamily(f"{PREFIX}_tasks", "Tasks ended, by outcome", labels=["outcome"])
        for field, outcome in _OUTCOMES.items():
            tasks.add_metric([outcome], status.get(field, 0))
        yield tasks
        slots = GaugeMetricFamily(f"{PREFIX}_slots", "Task processes, busy or idle", labels=["state"])
        slots.add_metric(["busy"], status["busy"])
        slots.add_metric(["idle"], max(0, status["slots"] - status["busy"]))
        yield slots
        yield GaugeMetricFamily(f"{PREFIX}_queued_tasks", "Tasks waiting on the worker for a process",
                                value=status["queued"])
        yield GaugeMetricFamily(f"{PREFIX}_clients", "Connected clients (executors)", value=status["clients"])
        yield GaugeMetricFamily(f"{PREFIX}_uptime_seconds", "Seconds since the worker started", value=status["uptime"])
        yield GaugeMetricFamily(f"{PREFIX}_draining", "1 while the worker drains", value=int(status["draining"]))
        yield CounterMetricFamily(f"{PREFIX}_received_bytes", "Bytes received from clients",
                                  value=status["bytes_received"])
        yield CounterMetricFamily(f"{PREFIX}_sent_bytes", "Bytes sent to clients", value=status["bytes_sent"])
        yield self._durations(status, HistogramMetricFamily)
        yield CounterMetricFamily(f"{PREFIX}_cache_hits", "Tasks that named a buffer the worker kept",
                                  value=status.get("kept_reused", 0))
        yield GaugeMetricFamily(f"{PREFIX}_cache_bytes", "Bytes of buffers kept for clients", value=status["kept_bytes"])
        yield GaugeMetricFamily(f"{PREFIX}_cache_budget_bytes", "The most bytes kept (--cache-size)",
                                value=status["keep_bytes"])
        offered = GaugeMetricFamily(f"{PREFIX}_resources", "Resources offered (--resources)", labels=["name"])
        used = GaugeMetricFamily(f"{PREFIX}_resources_in_use", "Resources held by running tasks", labels=["name"])
        for name, amount in sorted(status["resources"].items()):
            offered.add_metric([name], amount)
            used.add_metric([name], status["resources_in_use"].get(name, 0.0))
        yield offered
        yield used
        info = GaugeMetricFamily(f"{PREFIX}_worker_info", "The worker's versions and identity (always 1)",
                                 labels=["version", "python", "host", "instance"])
        info.add_metric([str(status["zmqexecutor"]), str(status["python"]), str(status["host"]),
                         str(status["instance"])], 1)
        yield info

    @staticmethod
    def _durations(status: dict[str, Any], family: Any) -> Any:
        return family(f"{PREFIX}_task_duration_seconds", "How long tasks ran, from a free process to the reply",
                      buckets=status["duration_buckets"], sum_value=status["duration_sum"])


def serve(supervisor: Any, port: int, address: str) -> int:
    """Serve ``supervisor``'s metrics at http://ADDRESS:PORT/metrics from a thread; the port bound."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(WorkerCollector(supervisor))
    supervisor.publish_metrics()
    server, _ = start_http_server(port, address, registry=registry)
    bound: int = server.server_port
    return bound
