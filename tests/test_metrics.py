"""GET /metrics as an operator reads it, from a real uvicorn server: the series exist with the right type
(cache counts as counters, queue wait and time per output token as histograms, requests by task version)
and move when their event happens; version series stay bounded; client disconnects are counted."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from api_helpers import prompt_artifact_bytes
from live_server import threaded_server
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import MAX_VERSIONS_PER_TASK

Families = dict[str, tuple[str, list[tuple[str, dict[str, str], float]]]]  # name -> (type, samples)
COUNTERS = (
    "softserve_requests",
    "softserve_generated_tokens",
    "softserve_prompt_tokens",
    "softserve_cache_hits",
    "softserve_cache_misses",
    "softserve_cache_evictions",
    "softserve_cache_inserts",
    "softserve_prefix_builds",
    "softserve_client_disconnects",
)
HISTOGRAMS = (
    "softserve_queue_wait_seconds",
    "softserve_time_per_output_token_seconds",
    "softserve_time_to_first_token_seconds",
    "softserve_request_seconds",
)


def scrape(client: httpx.Client) -> Families:
    text = client.get("/metrics").text
    return {
        f.name: (f.type, [(s.name, dict(s.labels), s.value) for s in f.samples])
        for f in text_string_to_metric_families(text)
    }


def value(families: Families, sample: str, **labels: str) -> float:
    """Sum of the samples named `sample` whose labels include `labels` (0 when there is none)."""
    family = sample.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
    _, samples = families.get(family, ("", []))
    return sum(v for name, ls, v in samples if name == sample and labels.items() <= ls.items())


def label_values(families: Families, family: str, label: str, **labels: str) -> set[str]:
    _, samples = families.get(family, ("", []))
    return {ls[label] for _, ls, _ in samples if label in ls and labels.items() <= ls.items()}


def upload(client: httpx.Client, task: str, data: bytes) -> None:
    r = client.put(
        f"/tasks/{task}", files={"file": (f"{task}.safetensors", data, "application/octet-stream")}
    )
    assert r.status_code == 201, r.text


def generate(client: httpx.Client, task: str, tokens: int = 4) -> int:
    r = client.post("/generate", json={"task_id": task, "prompt": "hello there", "max_new_tokens": tokens})
    assert r.status_code == 200, r.text
    return len(r.json()["tokens"])


def wait_until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_series_have_their_types_and_move_with_their_events(tmp_path: Path) -> None:
    # caches of 1 KiB: one tiny serving form (prompt [4, 64] fp32) fits, a second evicts it; a KV prefix
    # ([2, 2, 4, 16] keys + values) is bigger than the bound, so each new one evicts the one before
    bounds = {"cache_bytes": 1024, "prefix_cache_bytes": 1024}
    with (
        threaded_server(tmp_path, **bounds) as (url, state),
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        base = state.runner.fingerprint
        start = scrape(client)
        for name in COUNTERS:
            assert start[name][0] == "counter", (name, start[name][0])
        for name in HISTOGRAMS:
            assert start[name][0] == "histogram", (name, start[name][0])
        for name in ("softserve_queue_depth", "softserve_batch_size", "softserve_cache_bytes"):
            assert start[name][0] == "gauge", name
        text = client.get("/metrics").text
        assert (
            "# TYPE softserve_cache_hits_total counter" in text and "softserve_cache_hits gauge" not in text
        )

        upload(client, "one", prompt_artifact_bytes("one", base, seed=1))
        after_upload = scrape(client)
        for cache in ("serving_forms", "device_prefix"):  # the upload converted and built it ahead
            assert value(after_upload, "softserve_cache_inserts_total", cache=cache) > value(
                start, "softserve_cache_inserts_total", cache=cache
            )
        assert (
            value(after_upload, "softserve_prefix_builds_total")
            == value(start, "softserve_prefix_builds_total") + 1
        )

        n_tokens = generate(client, "one")
        assert n_tokens >= 2  # greedy on a fixed tiny model: deterministic
        warm = scrape(client)
        for cache in ("serving_forms", "device_prefix"):
            assert value(warm, "softserve_cache_hits_total", cache=cache) > value(
                after_upload, "softserve_cache_hits_total", cache=cache
            )
        assert value(warm, "softserve_requests_total", task="one", version="1") == 1
        assert value(warm, "softserve_generated_tokens_total", task="one", version="1") == n_tokens
        assert value(warm, "softserve_prompt_tokens_total", task="one", version="1") > 0
        assert value(warm, "softserve_queue_wait_seconds_count", task="one") == 1
        assert value(warm, "softserve_time_per_output_token_seconds_count", task="one") == 1
        assert value(warm, "softserve_time_per_output_token_seconds_sum", task="one") > 0

        upload(client, "two", prompt_artifact_bytes("two", base, seed=2))  # evicts "one" from both caches
        generate(client, "one")  # converted and built again: misses
        moved = scrape(client)
        for name in ("softserve_cache_evictions_total", "softserve_cache_misses_total"):
            for cache in ("serving_forms", "device_prefix"):
                assert value(moved, name, cache=cache) > value(warm, name, cache=cache), (name, cache)
        assert (
            value(moved, "softserve_prefix_builds_total") >= value(warm, "softserve_prefix_builds_total") + 2
        )
        assert value(moved, "softserve_queue_wait_seconds_count", task="one") == 2
        assert value(moved, "softserve_requests_total", task="one") == 2


def test_requests_are_counted_by_task_version_and_old_versions_drop_out(tmp_path: Path) -> None:
    with threaded_server(tmp_path) as (url, state), httpx.Client(base_url=url, timeout=30) as client:
        base = state.runner.fingerprint
        versions = MAX_VERSIONS_PER_TASK + 1
        for v in range(1, versions + 1):
            upload(client, "t", prompt_artifact_bytes("t", base, seed=v))
            generate(client, "t", tokens=1)
            generate(client, "t", tokens=1)
            families = scrape(client)
            assert value(families, "softserve_requests_total", task="t", version=str(v)) == 2
        generate(client, "base", tokens=1)
        families = scrape(client)
        kept = {str(v) for v in range(versions - MAX_VERSIONS_PER_TASK + 1, versions + 1)}
        for family in ("softserve_requests", "softserve_generated_tokens", "softserve_prompt_tokens"):
            assert label_values(families, family, "version", task="t") == kept, family
        assert label_values(families, "softserve_requests", "version", task="base") == {"0"}


def test_client_disconnects_are_counted(tmp_path: Path) -> None:
    with (
        threaded_server(tmp_path, max_new_tokens=400) as (url, state),
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        engine = state.engine
        before = scrape(client)
        assert value(before, "softserve_client_disconnects_total") == 0

        body = {"prompt": "tell me everything", "max_new_tokens": 400, "stream": True}
        with client.stream("POST", "/generate", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    break  # leaving the block closes the connection mid-stream

        def counted(n: int) -> bool:
            families = scrape(client)
            return (
                value(families, "softserve_client_disconnects_total") == n
                and value(families, "softserve_requests_total", task="base", finish_reason="cancelled") == n
            )

        wait_until(lambda: counted(1), "the streaming disconnect was not counted")
        wait_until(lambda: engine.load() == (0, 0), "the streaming request never left")

        data = json.dumps({"prompt": "and more", "max_new_tokens": 400}).encode()
        host, port = url.removeprefix("http://").split(":")
        head = "POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        head += f"Content-Length: {len(data)}\r\n\r\n"
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(head.encode() + data)
            wait_until(lambda: engine.load()[0] == 1, "the request never reached the batch")
        wait_until(lambda: counted(2), "the non-streaming disconnect was not counted")
        assert value(scrape(client), "softserve_requests_total", finish_reason="length") == 0
