"""What is stored is exactly what was validated, on disk and Redis, over real HTTP (uvicorn).

A manifest is checked in its stored form (the version number written in, serialised once): one that only
fits as sent is refused with 413 and changes nothing (no version burnt, CURRENT untouched). One task broken
behind the server's back never breaks listing or any other task.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from api_helpers import prompt_artifact_bytes
from live_server import threaded_server
from upload_helpers import artifact_with_manifest, compact, manifest_dict, put_files

from prompt_store import Fingerprint, Limits
from prompt_store.backends import DiskStore, RedisStore
from prompt_store.backends.redis_store import Keys

LIMIT = Limits().max_manifest_chars


@contextmanager
def live(tmp_path: Path, backend: str, redis_url: str | None) -> Iterator[tuple[httpx.Client, Any]]:
    store = RedisStore(redis_url) if backend == "redis" and redis_url else DiskStore(tmp_path / "store")
    with threaded_server(tmp_path, store=store) as (url, state), httpx.Client(base_url=url, timeout=30) as c:
        yield c, state


@pytest.fixture(params=["disk", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture()
def maybe_redis(backend: str, request: pytest.FixtureRequest) -> str | None:
    return str(request.getfixturevalue("redis_url")) if backend == "redis" else None


def upload(client: httpx.Client, task_id: str, data: bytes) -> httpx.Response:
    return put_files(client, task_id, [(f"{task_id}.safetensors", data)])


def generate(client: httpx.Client, task_id: str) -> httpx.Response:
    return client.post("/generate", json={"task_id": task_id, "prompt": "hello", "max_new_tokens": 3})


def test_non_ascii_manifest_within_the_limit_is_stored_listed_and_served(
    tmp_path: Path, backend: str, maybe_redis: str | None
) -> None:
    with live(tmp_path, backend, maybe_redis) as (client, state):
        base = state.runner.fingerprint
        notes = "é" * 30_000  # 30,000 characters as sent; escaped (\\u00e9) they would be 180,000
        raw = compact(manifest_dict("intl", base, notes=notes))
        assert len(raw) < LIMIT < len(raw.encode("ascii", "backslashreplace"))
        r = upload(client, "intl", artifact_with_manifest(raw, base))
        assert r.status_code == 201, r.text
        listed = client.get("/tasks")
        assert listed.status_code == 200 and [t["task_id"] for t in listed.json()["tasks"]] == ["intl"]
        assert generate(client, "intl").status_code == 200
        assert state.store.get("intl").manifest.notes == notes


def test_a_manifest_that_only_fits_as_sent_is_refused_and_changes_nothing(
    tmp_path: Path, backend: str, maybe_redis: str | None
) -> None:
    with live(tmp_path, backend, maybe_redis) as (client, state):
        base = state.runner.fingerprint
        for seed in range(9):
            assert upload(client, "edge", prompt_artifact_bytes("edge", base, seed=seed)).status_code == 201
        before = client.get("/tasks/edge").json()
        assert before["version"] == 9
        # exactly at the limit as sent (version 0); written as version 10 it is one character longer
        good = manifest_dict("edge", base, seed=100, notes="")
        raw = compact({**good, "notes": "n" * (LIMIT - len(compact(good)))})
        assert len(raw) == LIMIT
        r = upload(client, "edge", artifact_with_manifest(raw, base, seed=100))
        assert r.status_code == 413, r.text
        assert r.json()["error"]["field"] == "manifest" and str(LIMIT) in r.json()["error"]["message"]
        assert client.get("/tasks/edge").json() == before  # CURRENT untouched
        assert client.get("/tasks").status_code == 200
        assert generate(client, "edge").json()["task_version"] == 9
        if backend == "disk":
            assert not (tmp_path / "store" / "tasks" / "edge" / "v10.safetensors").exists()
        else:
            assert int(redis.Redis.from_url(str(maybe_redis)).get(Keys("softserve").seq("edge")) or 0) == 9
        r = upload(client, "edge", prompt_artifact_bytes("edge", base, seed=10))
        assert r.status_code == 201 and r.json()["version"] == 10  # no version number was burnt


def break_behind_the_server(
    tmp_path: Path, backend: str, redis_url: str | None, big: str, base: Fingerprint
) -> None:
    """Task `big` gets a (well-formed) manifest over the limit, `junk` an unreadable pointer or manifest."""
    if backend == "disk":
        tasks = tmp_path / "store" / "tasks"
        (tasks / "big" / "v1.safetensors").write_bytes(artifact_with_manifest(big, base))
        (tasks / "junk" / "CURRENT").write_text("not a pointer\n")
        return
    admin = redis.Redis.from_url(str(redis_url))
    k = Keys("softserve")
    admin.set(k.manifest("big", 1), big.encode())
    admin.set(k.manifest("junk", 1), b"[1, 2")
    admin.close()


def test_one_broken_task_never_breaks_listing_or_other_tasks(
    tmp_path: Path, backend: str, maybe_redis: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    with live(tmp_path, backend, maybe_redis) as (client, state):
        base = state.runner.fingerprint
        for task_id in ("alpha", "big", "junk", "omega"):
            assert upload(client, task_id, prompt_artifact_bytes(task_id, base)).status_code == 201
        big = compact(manifest_dict("big", base, version=1, notes="x" * LIMIT))
        break_behind_the_server(tmp_path, backend, maybe_redis, big, base)
        with caplog.at_level(logging.WARNING):
            listed = client.get("/tasks")
        assert listed.status_code == 200, listed.text
        assert [t["task_id"] for t in listed.json()["tasks"]] == ["alpha", "omega"]
        assert any("big" in rec.getMessage() and "left out" in rec.getMessage() for rec in caplog.records)
        assert any("junk" in rec.getMessage() and "left out" in rec.getMessage() for rec in caplog.records)
        for task_id in ("big", "junk"):
            r = client.get(f"/tasks/{task_id}")
            assert 400 <= r.status_code < 500, r.text  # named, never a 500
        for task_id in ("alpha", "omega"):
            assert generate(client, task_id).status_code == 200
