"""Prometheus metrics of the server: per-request counters and latency histograms updated by
the handlers, and engine gauges read from `rt.stats()` at scrape time (so they are never
stale and cost nothing between scrapes)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24,
    20.48, 40.96,
)  # fmt: skip


class _EngineCollector(Collector):
    # (stats key, metric name, help, is a counter)
    _STATS: tuple[tuple[str, str, str, bool], ...] = (
        ("used_blocks", "alora_kv_blocks_used", "KV blocks held by requests", False),
        ("cached_blocks", "alora_kv_blocks_cached", "Free KV blocks kept as prefix cache", False),
        ("free_blocks", "alora_kv_blocks_free", "KV blocks free", False),
        ("total_blocks", "alora_kv_blocks_total", "KV blocks in the pool", False),
        ("running", "alora_requests_running", "Requests being computed", False),
        ("waiting", "alora_requests_waiting", "Requests queued in the engine", False),
        ("resident_adapters", "alora_adapters_resident", "Adapters in device pools", False),
        ("preemptions", "alora_preemptions", "Requests preempted (recomputed)", True),
        ("adapter_loads", "alora_adapter_swaps_in", "Adapter page-ins to device", True),
        ("adapter_evictions", "alora_adapter_swaps_out", "Adapter evictions from device", True),
    )

    def __init__(self, stats: Callable[[], dict[str, Any]], queue: Callable[[], int]) -> None:
        self._stats = stats
        self._queue = queue

    def collect(self) -> Iterator[Any]:
        try:
            stats = self._stats()
        except Exception:  # a closed runtime: report what the app knows
            stats = {}
        for key, name, doc, counter in self._STATS:
            if key not in stats:
                continue
            family = CounterMetricFamily if counter else GaugeMetricFamily
            yield family(name, doc, value=float(stats[key]))
        yield GaugeMetricFamily(
            "alora_server_requests_in_flight",
            "Sequences admitted by the HTTP server and not finished (the admission queue)",
            value=float(self._queue()),
        )


class Metrics:
    def __init__(self, stats: Callable[[], dict[str, Any]], queue: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "alora_requests",
            "HTTP generation requests by model and status",
            ["model", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "alora_prompt_tokens", "Prompt tokens of finished sequences", ["model"], registry=r
        )
        self.cached_tokens = Counter(
            "alora_cached_prompt_tokens",
            "Prompt tokens whose KV came from the prefix cache",
            ["model"],
            registry=r,
        )
        self.generation_tokens = Counter(
            "alora_generation_tokens", "Generated tokens", ["model"], registry=r
        )
        self.ttft = Histogram(
            "alora_time_to_first_token_seconds",
            "Time to first token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "alora_inter_token_latency_seconds",
            "Time between tokens of a sequence",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "alora_request_latency_seconds",
            "Request latency, end to end",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "alora_requests_rejected", "Requests refused by admission (503)", registry=r
        )
        r.register(_EngineCollector(stats, queue))

    def render(self) -> bytes:
        return generate_latest(self.registry)
