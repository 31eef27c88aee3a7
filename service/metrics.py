"""Prometheus metrics of one service instance (its own registry, served at /metrics).

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

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
    """Every metric of the service, registered in a registry of its own."""

    def __init__(self) -> None:
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
            "retrieval_queue_depth", "Queries waiting for a batch.", registry=r
        )
        self.in_flight = Gauge(
            "retrieval_in_flight_requests", "Retrieval and embed requests admitted now.", registry=r
        )
        self.rejected = Counter(
            "retrieval_rejected", "Requests refused or cut short.", ["reason"], registry=r
        )
        self.index_version = Gauge(
            "retrieval_index_version_info",
            "The index version serving (value 1).",
            ["version"],
            registry=r,
        )
        self.index_items = Gauge("retrieval_index_items", "Items in the serving index.", registry=r)
        self.swaps = Counter(
            "retrieval_index_swaps", "Index version loads, by result.", ["result"], registry=r
        )
        self.model_version = Gauge(
            "retrieval_model_info", "The model bundle loaded (value 1).", ["version"], registry=r
        )
        self.cache = Counter(
            "retrieval_cache_requests", "Response cache lookups, by result.", ["result"], registry=r
        )
        self.cache_hit_ratio = Gauge(
            "retrieval_cache_hit_ratio", "Cache hits / (hits + misses) since start.", registry=r
        )
        self.redis_up = Gauge("retrieval_redis_up", "1 when Redis is reachable.", registry=r)
        self._hits = 0
        self._misses = 0
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
        self.index_version.clear()
        self.index_version.labels(version=version).set(1)
        self.index_items.set(num_items)

    def set_model_version(self, version: str) -> None:
        self.model_version.clear()
        self.model_version.labels(version=version).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
