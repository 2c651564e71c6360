"""Per-task metric series are bounded (SOFTSERVE_METRICS_MAX_TASKS, the rest under task="_other") and go
away with their task, on real uvicorn: 300 tasks uploaded, generated on and deleted leave no series."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from api_helpers import prompt_artifact_bytes
from live_server import threaded_server

N_TASKS = 300
CAP = 10
TASK_LABEL = re.compile(r'task="([^"]*)"')


def task_labels(metrics_text: str) -> set[str]:
    return set(TASK_LABEL.findall(metrics_text))


def series_count(metrics_text: str) -> int:
    return sum(1 for line in metrics_text.splitlines() if line and not line.startswith("#"))


def series(metrics_text: str, name: str, task: str) -> list[str]:
    """Sample lines of metric `name` labelled task=`task` (label order is the library's)."""
    return [
        line
        for line in metrics_text.splitlines()
        if line.startswith(f"softserve_{name}{{") and f'task="{task}"' in line
    ]


def requests_total(metrics_text: str, task: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in series(metrics_text, "requests_total", task))


def upload_and_generate(client: httpx.Client, task: str, files: dict[str, tuple[str, bytes, str]]) -> None:
    assert client.put(f"/tasks/{task}", files=files).status_code == 201
    body = {"task_id": task, "prompt": "hi", "max_new_tokens": 1}
    assert client.post("/generate", json=body).status_code == 200


def test_300_deleted_tasks_leave_no_series_and_live_ones_are_capped(tmp_path: Path) -> None:
    with (
        threaded_server(tmp_path, metrics_max_tasks=CAP) as (url, state),
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        fingerprint = state.runner.fingerprint
        data = prompt_artifact_bytes("t", fingerprint)
        files = {"file": ("t.safetensors", data, "application/octet-stream")}
        ids = [f"t{i:03d}" for i in range(N_TASKS)]
        for task in ids[:CAP]:  # the first CAP tasks, in order, take the slots
            upload_and_generate(client, task, files)
        with ThreadPoolExecutor(8) as pool:  # the rest concurrently (batched by the engine): faster
            list(pool.map(lambda task: upload_and_generate(client, task, files), ids[CAP:]))
        assert client.post("/generate", json={"prompt": "hi", "max_new_tokens": 2}).status_code == 200

        text = client.get("/metrics").text
        labels = task_labels(text)
        assert labels == {*ids[:CAP], "base", "_other"}, sorted(labels)[:20]  # first CAP tasks, then _other
        assert requests_total(text, "_other") == N_TASKS - CAP  # the rest are counted, under one label
        assert requests_total(text, ids[0]) == 1
        per_label = max(sum(f'task="{t}"' in line for line in text.splitlines()) for t in labels)
        assert series_count(text) < 40 + per_label * (CAP + 2)  # bounded by the cap, not by N_TASKS

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(lambda task: client.delete(f"/tasks/{task}").status_code, ids)) == {204}
        text = client.get("/metrics").text
        assert task_labels(text) <= {"base", "_other"}, sorted(task_labels(text))[:20]

        # a freed slot is reused: a new task gets its own series again
        assert client.put("/tasks/fresh", files=files).status_code == 201
        body = {"task_id": "fresh", "prompt": "hi", "max_new_tokens": 2}
        assert client.post("/generate", json=body).status_code == 200
        assert "fresh" in task_labels(client.get("/metrics").text)


def test_default_cap_keeps_deleted_task_series_out(tmp_path: Path) -> None:
    """Without a configured cap: a deleted task's series are gone (requests, tokens, prompt tokens, ttft,
    latency), other tasks' series stay."""
    with threaded_server(tmp_path) as (url, state), httpx.Client(base_url=url, timeout=30) as client:
        data = prompt_artifact_bytes("t", state.runner.fingerprint)
        files = {"file": ("t.safetensors", data, "application/octet-stream")}
        for task in ("gone", "kept"):
            assert client.put(f"/tasks/{task}", files=files).status_code == 201
            body = {"model": task, "prompt": "hi", "max_tokens": 2}
            assert client.post("/v1/completions", json=body).status_code == 200
        before = client.get("/metrics").text
        names = ("requests_total", "generated_tokens_total", "prompt_tokens_total")
        names += ("time_to_first_token_seconds_count", "request_seconds_count")
        for name in names:
            assert series(before, name, "gone") and series(before, name, "kept"), name
        assert client.delete("/tasks/gone").status_code == 204
        after = client.get("/metrics").text
        assert 'task="gone"' not in after
        assert all(series(after, name, "kept") for name in names)
