"""Prometheus metrics of one server instance (its own registry, no global state).

What it owns: request/token counters and latency histograms labelled by adapter
(the served model name: the base model's name or an adapter's), and gauges
refreshed from ``AsyncLLM.stats()`` at scrape time (queue length, running
requests, KV usage, adapters resident on the device vs held on the host).
Label values are bounded: requests for unknown models are counted under
``adapter="<unknown>"``.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

UNKNOWN = "<unknown>"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    """All metrics of one app, registered in a fresh ``CollectorRegistry``."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("inlaid_requests", "Finished requests", ["adapter", "status"], registry=r)
        self.prompt_tokens = Counter("inlaid_prompt_tokens", "Prompt tokens processed", ["adapter"], registry=r)
        self.generation_tokens = Counter("inlaid_generation_tokens", "Tokens generated", ["adapter"], registry=r)
        self.latency = Histogram(
            "inlaid_request_latency_seconds", "End-to-end request latency", ["adapter"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "inlaid_time_to_first_token_seconds", "Time to first generated token", ["adapter"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.waiting = Gauge("inlaid_num_requests_waiting", "Requests waiting in the scheduler queue", registry=r)
        self.running = Gauge("inlaid_num_requests_running", "Requests running", registry=r)
        self.kv_usage = Gauge("inlaid_kv_cache_usage_ratio", "Fraction of KV blocks in use (0..1)", registry=r)
        self.kv_used = Gauge("inlaid_kv_blocks_used", "KV blocks in use", registry=r)
        self.kv_total = Gauge("inlaid_kv_blocks_total", "KV blocks allocated", registry=r)
        self.adapters = Gauge("inlaid_adapters", "Adapters by location (device slots vs host memory)", ["location"], registry=r)
        self.adapter_resident = Gauge(
            "inlaid_adapter_resident", "1 if the adapter is resident on the device, 0 if only on the host",
            ["adapter"], registry=r,
        )

    def observe_finished(
        self, adapter: str, status: str, prompt_tokens: int, gen_tokens: int, latency: float, ttft: float | None
    ) -> None:
        """Record one finished (or failed-after-admission) request."""
        self.requests.labels(adapter, status).inc()
        self.prompt_tokens.labels(adapter).inc(prompt_tokens)
        self.generation_tokens.labels(adapter).inc(gen_tokens)
        self.latency.labels(adapter).observe(latency)
        if ttft is not None:
            self.ttft.labels(adapter).observe(ttft)

    def observe_rejected(self, adapter: str, status: int) -> None:
        """Record a request refused before admission (HTTP status as the label)."""
        self.requests.labels(adapter, str(status)).inc()

    def refresh(self, stats: dict[str, Any]) -> None:
        """Copy engine stats into the gauges (called at scrape time)."""
        self.waiting.set(stats.get("num_waiting", 0))
        self.running.set(stats.get("num_running", 0))
        self.kv_usage.set(stats.get("kv_usage", 0.0))
        self.kv_used.set(stats.get("kv_blocks_used", 0))
        self.kv_total.set(stats.get("kv_blocks_total", 0))
        resident = list(stats.get("adapters_resident", []))
        host = list(stats.get("adapters_host", []))
        self.adapters.labels("device").set(len(resident))
        self.adapters.labels("host").set(len(host))
        self.adapter_resident.clear()
        for name in set(host) | set(resident):
            self.adapter_resident.labels(name).set(1 if name in resident else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
