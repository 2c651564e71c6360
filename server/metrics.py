"""Prometheus metrics of one app instance (own registry, so tests can build many apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "softserve_requests", "Generation requests finished", ["task", "finish_reason"], registry=r
        )
        self.rejections = Counter(
            "softserve_rejections", "Requests rejected, by reason", ["reason"], registry=r
        )
        self.tokens = Counter("softserve_generated_tokens", "Generated tokens", ["task"], registry=r)
        self.prompt_tokens = Counter(
            "softserve_prompt_tokens", "Prompt tokens prefilled", ["task"], registry=r
        )
        self.ttft = Histogram(
            "softserve_time_to_first_token_seconds",
            "Time from submit to first token",
            ["task"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.latency = Histogram(
            "softserve_request_seconds",
            "Request latency",
            ["task"],
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.queue_depth = Gauge("softserve_queue_depth", "Requests waiting to join the batch", registry=r)
        self.batch_size = Gauge("softserve_batch_size", "Rows in the running batch", registry=r)
        self.tokens_per_s = Gauge("softserve_tokens_per_second", "Decode throughput (recent)", registry=r)
        self.cache_hits = Gauge("softserve_cache_hits", "Serving-form cache hits", ["cache"], registry=r)
        self.cache_misses = Gauge(
            "softserve_cache_misses", "Serving-form cache misses", ["cache"], registry=r
        )
        self.cache_bytes = Gauge("softserve_cache_bytes", "Bytes held by a cache", ["cache"], registry=r)
        self.uploads = Counter("softserve_task_uploads", "Accepted task uploads", ["method"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
