"""Prometheus metrics of one service instance (its own registry, served at /metrics).

With several worker processes (`retrieval serve --workers N`, `service.workers`) the
supervisor names a private directory in ``PROMETHEUS_MULTIPROC_DIR`` before it starts the
workers; prometheus_client then keeps every value in a memory-mapped file per process, and
/metrics, whichever worker answers it, reports all the workers together: counters and
histograms summed (a replaced worker's counts stay in the totals), in-flight requests and
queue depth summed over the live workers, the version gauges 1 where any live worker
serves that version (0 for versions served before), `retrieval_redis_up` the lowest of the live workers and the cache hit
ratio computed from the summed counters. The queue depth of a worker is written to its file
every `REFRESH_S` (and when it answers /metrics).

=========================================  =========  =====================================
metric                                     type       labels / meaning
=========================================  =========  =====================================
retrieval_http_requests_total              counter    route, method, status
retrieval_http_request_duration_seconds    histogram  route, method, status
retrieval_batch_size                       histogram  queries per model pass + search
retrieval_batch_duration_seconds           histogram  encode + embed + search + ids, per batch
retrieval_queue_depth                      gauge      queries waiting for a batch
retrieval_in_flight_requests               gauge      retrieval requests admitted now
retrieval_rejected_total                   counter    reason: overload | timeout
retrieval_index_version_info               gauge      version (1 = the version serving)
retrieval_index_items                      gauge      catalog size of the serving version
retrieval_index_swaps_total                counter    result: ok | failed
retrieval_model_info                       gauge      version (1 = the loaded bundle)
retrieval_cache_requests_total             counter    result: hit | miss | error
retrieval_cache_hit_ratio                  gauge      hits / (hits + misses) since start
retrieval_redis_up                         gauge      1 reachable, 0 down (backing off)
=========================================  =========  =====================================
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client when imported
REFRESH_S = 1.0  # how often a worker writes its queue depth (multi-process only)

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.025,
    0.035,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class ServiceMetrics:
    """Every metric of the service, registered in a registry of its own.

    Args:
        multiprocess_dir: the shared directory of a multi-process server (default: the
            ``PROMETHEUS_MULTIPROC_DIR`` variable, which must then have been set before
            prometheus_client was first imported); None: this process alone.
    """

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir or os.environ.get(MULTIPROCESS_ENV) or None
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "retrieval_http_requests",
            "HTTP requests answered.",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "retrieval_http_request_duration_seconds",
            "HTTP request latency, first byte in to last byte out.",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "retrieval_batch_size", "Queries per micro-batch.", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "retrieval_batch_duration_seconds",
            "Time of one micro-batch (encode, embed, search, ids).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "retrieval_queue_depth",
            "Queries waiting for a batch.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.in_flight = Gauge(
            "retrieval_in_flight_requests",
            "Retrieval and embed requests admitted now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.rejected = Counter(
            "retrieval_rejected", "Requests refused or cut short.", ["reason"], registry=r
        )
        self.index_version = Gauge(
            "retrieval_index_version_info",
            "The index version serving (value 1).",
            ["version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.index_items = Gauge(
            "retrieval_index_items",
            "Items in the serving index.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.swaps = Counter(
            "retrieval_index_swaps", "Index version loads, by result.", ["result"], registry=r
        )
        self.model_version = Gauge(
            "retrieval_model_info",
            "The model bundle loaded (value 1).",
            ["version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.cache = Counter(
            "retrieval_cache_requests", "Response cache lookups, by result.", ["result"], registry=r
        )
        self.redis_up = Gauge(
            "retrieval_redis_up",
            "1 when Redis is reachable.",
            registry=r,
            multiprocess_mode="livemin",
        )
        self._hits = 0
        self._misses = 0
        self._queue_depth: Callable[[], float] | None = None
        self._index_version: str | None = None
        self._model_version: str | None = None
        if self.multiprocess_dir is None:  # multi-process: derived from the summed counters
            self.cache_hit_ratio = Gauge(
                "retrieval_cache_hit_ratio",
                "Cache hits / (hits + misses) since start.",
                registry=r,
            )
            self.cache_hit_ratio.set_function(self._hit_ratio)
        for result in ("ok", "failed"):
            self.swaps.labels(result=result)
        for result in ("hit", "miss", "error"):
            self.cache.labels(result=result)
        for reason in ("overload", "timeout"):
            self.rejected.labels(reason=reason)

    def _hit_ratio(self) -> float:
        total = self._hits + self._misses
        return self._hits / total if total else 0.0

    def observe_cache(self, result: str) -> None:
        self.cache.labels(result=result).inc()
        if result == "hit":
            self._hits += 1
        elif result == "miss":
            self._misses += 1

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def set_index_version(self, version: str, num_items: int) -> None:
        # The old version's value goes to 0 first: a multi-process file keeps what `clear`
        # only drops from memory.
        if self._index_version is not None:
            self.index_version.labels(version=self._index_version).set(0)
        if self.multiprocess_dir is None:  # not implemented for files (the 0 stays)
            self.index_version.clear()
        self.index_version.labels(version=version).set(1)
        self._index_version = version
        self.index_items.set(num_items)

    def set_model_version(self, version: str) -> None:
        if self._model_version is not None:
            self.model_version.labels(version=self._model_version).set(0)
        if self.multiprocess_dir is None:
            self.model_version.clear()
        self.model_version.labels(version=version).set(1)
        self._model_version = version

    def track_queue_depth(self, depth: Callable[[], float]) -> None:
        """Report `depth()` as `retrieval_queue_depth` (read at each /metrics in one
        process; written every `REFRESH_S` by `refresh_forever` with several)."""
        self._queue_depth = depth
        if self.multiprocess_dir is None:
            self.queue_depth.set_function(depth)

    def refresh(self) -> None:
        """Write this worker's polled values to its file (multi-process only)."""
        if self.multiprocess_dir is not None and self._queue_depth is not None:
            self.queue_depth.set(self._queue_depth())

    async def refresh_forever(self, period_s: float = REFRESH_S) -> None:
        """`refresh` every `period_s` (a task of a multi-process worker; cancel to stop)."""
        while True:
            self.refresh()
            await asyncio.sleep(period_s)

    def render(self) -> bytes:
        """The text exposition: this process's registry, or all workers' files."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        self.refresh()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_WorkersCollector(self.multiprocess_dir))
        return generate_latest(registry)


class _WorkersCollector:
    """Every worker's metrics from the shared directory, plus the cache hit ratio derived
    from the summed cache counters (a ratio cannot be summed over workers)."""

    def __init__(self, path: str) -> None:
        self._files = MultiProcessCollector(None, path=path)

    def collect(self) -> Iterable[Metric]:
        hits = misses = 0.0
        for metric in self._files.collect():
            if metric.name == "retrieval_cache_requests":
                for sample in metric.samples:
                    if sample.name.endswith("_total"):
                        result = sample.labels.get("result")
                        hits += sample.value if result == "hit" else 0.0
                        misses += sample.value if result == "miss" else 0.0
            yield metric
        ratio = GaugeMetricFamily(
            "retrieval_cache_hit_ratio", "Cache hits / (hits + misses) since start."
        )
        ratio.add_metric([], hits / (hits + misses) if hits + misses else 0.0)
        yield ratio
