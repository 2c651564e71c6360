"""Prometheus metrics of one app instance (own registry, so tests can build many apps).

Per-task series are bounded: the first `max_tasks` tasks seen get their own `task` label, later ones are
counted under `task="_other"` until a slot frees; deleting a task removes its series (`forget_task`). The
request and token counters also carry a `version` label (the task version that answered; "0" for the bare
model, "_other" under task="_other"); only the `max_versions` versions of a task seen last keep their
series, so a task that is re-uploaded all day does not grow the series count.

Counts kept elsewhere (the caches' hits, misses, evictions and inserts, the engine's queue and batch) are
read at scrape time by `ServerCollector` and exposed as counter and gauge families: Prometheus' way for
externally maintained totals (a Gauge set from a counter would lose `rate()` across restarts).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from server.requests import TokenEvent

OTHER_TASKS = "_other"
ALWAYS_LABELLED = frozenset({"base", OTHER_TASKS})  # the bare model never takes a slot
MAX_VERSIONS_PER_TASK = 3
CACHE_SERVING_FORMS = "serving_forms"  # prompt_store ServingCache: artifact -> serving form (CPU)
CACHE_DEVICE_PREFIX = "device_prefix"  # the engine's KV prefixes on the model's device
CACHE_PROMPT_BLOCKS = (
    "prompt_blocks"  # the prompt cache's KV blocks of prompt tokens (runtime/prompt_cache.py)
)


class CacheCounts(Protocol):
    """What the collector reads from a cache (prompt_store.lru.ByteLRU)."""

    hits: int
    misses: int
    evictions: int
    inserts: int
    bytes: int


class Metrics:
    def __init__(self, max_tasks: int = 100, max_versions: int = MAX_VERSIONS_PER_TASK) -> None:
        self.max_tasks = max_tasks
        self.max_versions = max(1, max_versions)
        self._labelled: set[str] = set()
        self._versions: dict[str, list[str]] = {}  # task label -> version labels, most recent last
        self._lock = threading.Lock()
        self.registry = CollectorRegistry()
        r = self.registry
        by_version = ["task", "version"]
        self.requests = Counter(
            "softserve_requests",
            "Generation requests finished, by task version and finish_reason",
            [*by_version, "finish_reason"],
            registry=r,
        )
        self.rejections = Counter(
            "softserve_rejections", "Requests rejected, by reason", ["reason"], registry=r
        )
        self.tokens = Counter("softserve_generated_tokens", "Generated tokens", by_version, registry=r)
        self.prompt_tokens = Counter(
            "softserve_prompt_tokens", "Prompt tokens submitted for prefill", by_version, registry=r
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
        self.queue_wait = Histogram(
            "softserve_queue_wait_seconds",
            "Time from submit until the engine takes the request into a batch",
            ["task"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "softserve_time_per_output_token_seconds",
            "Per request: (last token - first token) / (tokens - 1), requests of 2+ tokens",
            ["task"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.client_disconnects = Counter(
            "softserve_client_disconnects",
            "Generation requests cancelled because the client went away before the end",
            registry=r,
        )
        self.uploads = Counter("softserve_task_uploads", "Accepted task uploads", ["method"], registry=r)

        # every metric with a `task` label, with its label names (forget_task removes their series)
        self._per_task: tuple[tuple[MetricWrapperBase, tuple[str, ...]], ...] = (
            (self.requests, ("task", "version", "finish_reason")),
            (self.tokens, ("task", "version")),
            (self.prompt_tokens, ("task", "version")),
            (self.ttft, ("task",)),
            (self.latency, ("task",)),
            (self.queue_wait, ("task",)),
            (self.time_per_output_token, ("task",)),
        )

    def task_label(self, task_id: str) -> str:
        """The `task` label for `task_id`: its own while fewer than max_tasks tasks have one, else _other."""
        if task_id in ALWAYS_LABELLED:
            return task_id
        with self._lock:
            if task_id in self._labelled:
                return task_id
            if len(self._labelled) < self.max_tasks:
                self._labelled.add(task_id)
                return task_id
        return OTHER_TASKS

    def version_label(self, task: str, version: int) -> str:
        """The `version` label under task label `task`; a version beyond the task's `max_versions` most
        recent ones removes the oldest one's series."""
        if task == OTHER_TASKS:
            return OTHER_TASKS
        label = str(version)
        with self._lock:
            seen = self._versions.setdefault(task, [])
            if label in seen:
                seen.remove(label)
            seen.append(label)
            dropped = seen[: -self.max_versions]
            del seen[: -self.max_versions]
        for old in dropped:
            self._remove_series(task, version=old)
        return label

    def forget_task(self, task_id: str) -> None:
        """Remove every series of a deleted task and free its slot."""
        if task_id in ALWAYS_LABELLED:
            return
        with self._lock:
            self._labelled.discard(task_id)
            self._versions.pop(task_id, None)
        self._remove_series(task_id)

    def _remove_series(self, task: str, version: str | None = None) -> None:
        """Remove the series labelled `task` (and `version`, when given) from every per-task metric."""
        for metric, names in self._per_task:
            if version is not None and "version" not in names:
                continue
            label_sets = {
                tuple(sample.labels[n] for n in names)
                for family in metric.collect()
                for sample in family.samples
                if sample.labels.get("task") == task
                and (version is None or sample.labels.get("version") == version)
            }
            for values in label_sets:
                metric.remove(*values)

    def track(self, caches: Mapping[str, CacheCounts], engine_stats: Callable[[], Mapping[str, Any]]) -> None:
        """Expose the caches' counters and the engine's queue and batch, read at every scrape."""
        self.registry.register(ServerCollector(caches, engine_stats))

    def request(self, task_id: str, version: int, submitted_at: float, prompt_tokens: int) -> RequestMetrics:
        """The metrics of one generation request, from its submission on."""
        return RequestMetrics(self, task_id, version, submitted_at, prompt_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetrics:
    """Records one request's events: tokens, time to first token, queue wait, time per output token, its
    end (by finish_reason), or its client going away. Used on the event loop only."""

    def __init__(
        self, metrics: Metrics, task_id: str, version: int, submitted_at: float, prompt_tokens: int
    ) -> None:
        self.m = metrics
        self.task = metrics.task_label(task_id)
        self.version = version
        self.submitted_at = submitted_at
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.tokens = 0
        self.admitted = False
        self.m.prompt_tokens.labels(*self._labels()).inc(prompt_tokens)

    def _labels(self) -> tuple[str, str]:
        """(task, version), computed at each increment (no await between it and the increment)."""
        return self.task, self.m.version_label(self.task, self.version)

    def event(self, event: TokenEvent, admitted_at: float | None) -> None:
        now = time.monotonic()
        if not self.admitted and admitted_at is not None:
            self.admitted = True
            self.m.queue_wait.labels(task=self.task).observe(max(0.0, admitted_at - self.submitted_at))
        if event.token_id is not None:
            if self.first_at is None:
                self.first_at = now
                self.m.ttft.labels(task=self.task).observe(now - self.submitted_at)
            self.last_at = now
            self.tokens += 1
            self.m.tokens.labels(*self._labels()).inc()
        if event.finish_reason is not None:
            self.finished(event.finish_reason, now)

    def finished(self, finish_reason: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.m.requests.labels(*self._labels(), finish_reason).inc()
        self.m.latency.labels(task=self.task).observe(now - self.submitted_at)
        if self.tokens >= 2 and self.first_at is not None and self.last_at is not None:
            per_token = (self.last_at - self.first_at) / (self.tokens - 1)
            self.m.time_per_output_token.labels(task=self.task).observe(per_token)

    def client_gone(self) -> None:
        """The consumer stopped before the final event (a streaming client went away): cancelled."""
        self.m.client_disconnects.inc()
        self.finished("cancelled")


class ServerCollector(Collector):
    """Cache counters as counter families and the engine's state as gauges, read at scrape time."""

    def __init__(
        self, caches: Mapping[str, CacheCounts], engine_stats: Callable[[], Mapping[str, Any]]
    ) -> None:
        self.caches = dict(caches)
        self.engine_stats = engine_stats

    def collect(self) -> Iterator[Metric]:
        counters = {
            "hits": CounterMetricFamily("softserve_cache_hits", "Cache hits", labels=["cache"]),
            "misses": CounterMetricFamily("softserve_cache_misses", "Cache misses", labels=["cache"]),
            "evictions": CounterMetricFamily(
                "softserve_cache_evictions", "Entries evicted to stay within the byte bound", labels=["cache"]
            ),
            "inserts": CounterMetricFamily(
                "softserve_cache_inserts",
                "Entries built and inserted (serving_forms: artifact loaded and converted; "
                "device_prefix: KV prefix built)",
                labels=["cache"],
            ),
        }
        held = GaugeMetricFamily("softserve_cache_bytes", "Bytes held by a cache", labels=["cache"])
        for name, cache in self.caches.items():
            for attribute, family in counters.items():
                family.add_metric([name], getattr(cache, attribute))
            held.add_metric([name], cache.bytes)
        yield from counters.values()
        yield held
        prefix = self.caches.get(CACHE_DEVICE_PREFIX)
        if prefix is not None:
            yield CounterMetricFamily(
                "softserve_prefix_builds",
                "Task KV prefixes built on the device (embedding prefix run through the model, or moved)",
                value=prefix.inserts,
            )
        stats = self.engine_stats()
        for name, key, text in (
            ("softserve_queue_depth", "queue_depth", "Requests waiting to join the batch"),
            ("softserve_batch_size", "batch_size", "Rows in the running batch"),
            ("softserve_tokens_per_second", "tokens_per_s", "Decode throughput (recent)"),
        ):
            yield GaugeMetricFamily(name, text, value=float(stats.get(key, 0) or 0))
        for name, key, text in (
            (
                "softserve_prompt_cache_hit_tokens",
                "prompt_cache_hit_tokens",
                "Prompt tokens whose KV was reused",
            ),
            ("softserve_prompt_cache_miss_tokens", "prompt_cache_miss_tokens", "Prompt tokens prefilled"),
        ):
            yield CounterMetricFamily(name, text, value=float(stats.get(key, 0) or 0))
        yield GaugeMetricFamily(
            "softserve_prompt_cache_hit_rate",
            "Prompt tokens reused / all prompt tokens since start",
            value=float(stats.get("prompt_cache_hit_rate", 0.0) or 0.0),
        )
