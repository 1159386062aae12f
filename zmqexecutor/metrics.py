"""Prometheus metrics of a client, on request: what one executor submitted, has in flight, retried, and
how long its round trips took, served over HTTP for a Prometheus server to scrape::

    from zmqexecutor.metrics import serve_metrics

    with ZMQExecutor(endpoints) as ex:
        url = serve_metrics(ex, port=9464)  # http://127.0.0.1:9464/metrics

It needs the ``prometheus_client`` library (``pip install 'zmqexecutor[metrics]'``). A worker serves
its own with ``zmqexecutor worker --metrics-port``. Runs in the caller's thread (``serve_metrics``)
and in the HTTP server's thread, which copies plain counters the executor's I/O thread keeps.
"""

from __future__ import annotations

from typing import Any, Iterator

from ._executor import ZMQExecutor

__all__ = ["serve_metrics", "ClientCollector"]

PREFIX = "zmqexecutor_client"


class ClientCollector:
    """The metrics of one executor, read at each scrape (register it with a registry of your own)."""

    def __init__(self, executor: ZMQExecutor) -> None:
        self.executor = executor

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        scheduler = self.executor._handle.engine.scheduler
        workers = self.executor.workers()
        round_trips = scheduler.round_trips
        yield CounterMetricFamily(f"{PREFIX}_submitted_tasks", "Tasks this executor took in", value=scheduler.added)
        yield GaugeMetricFamily(f"{PREFIX}_in_flight_tasks", "Tasks sent and not answered yet",
                                value=sum(w.in_flight for w in workers))
        yield CounterMetricFamily(f"{PREFIX}_retried_tasks", "Tasks sent again after their worker was lost",
                                  value=scheduler.retried)
        yield CounterMetricFamily(f"{PREFIX}_lost_workers", "Times a worker was given up on",
                                  value=sum(w.lost for w in workers))
        states = GaugeMetricFamily(f"{PREFIX}_workers", "Workers, by state", labels=["state"])
        for state in ("connecting", "ready", "draining", "incompatible"):
            states.add_metric([state], sum(w.state == state for w in workers))
        yield states
        yield GaugeMetricFamily(f"{PREFIX}_slots", "Slots of the ready workers",
                                value=sum(w.slots for w in workers if w.state == "ready"))
        yield HistogramMetricFamily(f"{PREFIX}_round_trip_seconds", "From a task sent to its answer",
                                    buckets=round_trips.cumulative(), sum_value=round_trips.sum)


def serve_metrics(executor: ZMQExecutor, port: int = 0, address: str = "127.0.0.1") -> str:
    """Serve ``executor``'s metrics at ``http://ADDRESS:PORT/metrics`` from a thread of its own
    (``port`` 0: a free one) until this process exits; returns that URL. Every metric is named
    ``zmqexecutor_client_...``: submitted tasks, tasks in flight, retried tasks, lost workers, workers
    by state, slots, and a histogram of round trips."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(ClientCollector(executor))
    server, _ = start_http_server(port, address, registry=registry)
    return f"http://{address}:{server.server_port}/metrics"
