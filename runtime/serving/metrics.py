"""Prometheus metrics of one app, in a registry of its own (several apps may share a process)."""

from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class _RuntimeStats(Collector):
    """Queue depth and active rows, read from the scheduler when scraped."""

    def __init__(self, stats: Callable[[], dict | None]):
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self._stats()
        if stats is None:  # no runtime loaded yet
            return
        yield GaugeMetricFamily("jfexport_queue_depth", "Requests waiting for the scheduler.", stats["queue_depth"])
        yield GaugeMetricFamily("jfexport_queue_capacity", "Most requests the queue admits.", stats["max_queue"])
        rows = GaugeMetricFamily("jfexport_active_rows", "Batch rows held by active requests.", labels=["kind"])
        rows.add_metric(["generation"], stats["active_generation_rows"])
        rows.add_metric(["chat"], stats["active_chat_rows"])
        yield rows


class ServingMetrics:
    def __init__(self, stats: Callable[[], dict | None]):
        self.registry = CollectorRegistry()
        r = self.registry
        r.register(_RuntimeStats(stats))
        self.in_flight = Gauge("jfexport_requests_in_flight", "HTTP requests being answered.", registry=r)
        self.requests = Counter("jfexport_requests", "Answered requests.", ["kind", "status"], registry=r)
        self.latency = Histogram("jfexport_request_latency_seconds", "Time to the whole answer.", ["kind"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("jfexport_time_to_first_token_seconds", "Chat: request received to first token.",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.batch_rows = Histogram("jfexport_batch_rows", "Rows in each batched engine step.", ["kind"],
                                    buckets=_ROWS_BUCKETS, registry=r)
        self.tokens = Counter("jfexport_tokens", "Tokens.", ["direction"], registry=r)
        self.images = Counter("jfexport_images_generated", "Images generated.", registry=r)
        self.errors = Counter("jfexport_errors", "Error answers by type.", ["type"], registry=r)

    def observe_batch(self, kind: str, rows: int) -> None:
        """The runtime's batch observer (called from the scheduler thread; prometheus-client is thread-safe)."""
        self.batch_rows.labels(kind).observe(rows)
