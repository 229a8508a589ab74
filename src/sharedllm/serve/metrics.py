"""Prometheus metrics for one server process (its own registry, so several apps in one process never mix).

Counters and histograms are fed by the HTTP middleware and the engine's hooks; queue depth, active rows, the
adapter cache and the store size are read when scraped. `GET /metrics` (admin token) renders them.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServeMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("sharedllm_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.tokens_generated = Counter("sharedllm_tokens_generated", "tokens generated", registry=r)
        self.tokens_scored = Counter("sharedllm_tokens_scored", "tokens scored", registry=r)
        self.rows_dropped = Counter("sharedllm_rows_dropped", "generations dropped because the client left",
                                    registry=r)
        self.ttft = Histogram("sharedllm_time_to_first_token_seconds", "request arrival to first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("sharedllm_time_per_output_token_seconds", "time between a row's generated tokens",
                              buckets=LATENCY_BUCKETS, registry=r)

    # ---- engine hooks (called on the engine thread) -------------------------------------------------------
    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def next_token(self, seconds: float) -> None:
        self.tpot.observe(seconds)

    def generated(self, n: int) -> None:
        self.tokens_generated.inc(n)

    def scored(self, n: int) -> None:
        self.tokens_scored.inc(n)

    def dropped(self) -> None:
        self.rows_dropped.inc()

    # ---- scrape ------------------------------------------------------------------------------------------
    def watch(self, router) -> None:
        self.registry.register(_Live(router))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Live:
    """Values read from the router at scrape time."""

    def __init__(self, router):
        self.router = router

    def collect(self):
        s, store = self.router.stats(), self.router.store
        yield GaugeMetricFamily("sharedllm_queue_depth", "requests waiting for the engine", value=s["queued"])
        yield GaugeMetricFamily("sharedllm_active_rows", "generations in the running batch", value=s["active_rows"])
        yield CounterMetricFamily("sharedllm_adapter_cache_hits", "decoded-adapter cache hits", value=s["cache_hits"])
        yield CounterMetricFamily("sharedllm_adapter_cache_misses", "decoded-adapter cache misses",
                                  value=s["cache_misses"])
        yield GaugeMetricFamily("sharedllm_adapter_cache_entries", "decoded adapters in memory",
                                value=s["cache_entries"])
        yield GaugeMetricFamily("sharedllm_store_adapters", "adapters in the store", value=store.count())
        yield GaugeMetricFamily("sharedllm_store_bytes", "bytes of adapter files in the store",
                                value=store.total_bytes())
