"""Retention, on disk and on Redis, through the real app (uvicorn): a task keeps its last
SOFTSERVE_KEEP_VERSIONS versions (default 5) plus any version a running request holds; versions a crashed
writer never made current (and half-deleted tasks, temp files) are removed when the server starts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from api_helpers import prompt_artifact_bytes
from live_server import threaded_server
from store_helpers import build
from upload_helpers import put_files

from prompt_store import to_bytes, with_version
from prompt_store.backends import DiskStore, RedisStore
from prompt_store.backends.redis_store import Keys
from server.requests import GenerationRequest, SamplingParams
from server.settings import Settings

KEEP = 5
M = 16  # virtual tokens: a 4 KiB prompt per version


@pytest.fixture(params=["disk", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextmanager
def live(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> Iterator[tuple[httpx.Client, Any]]:
    if backend == "redis":
        store: Any = RedisStore(request.getfixturevalue("redis_url"))
    else:
        store = DiskStore(tmp_path / "store")
    with threaded_server(tmp_path, store=store) as (url, state), httpx.Client(base_url=url, timeout=30) as c:
        yield c, state


def upload(client: httpx.Client, task_id: str, base: Any, seed: int) -> dict[str, Any]:
    r = put_files(client, task_id, [("a.safetensors", prompt_artifact_bytes(task_id, base, m=M, seed=seed))])
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def test_keep_versions_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().keep_versions == KEEP
    monkeypatch.setenv("SOFTSERVE_KEEP_VERSIONS", "9")
    assert Settings().keep_versions == 9


def test_a_hundred_uploads_keep_five_versions_and_bounded_storage(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    with live(tmp_path, backend, request) as (client, state):
        base = state.runner.fingerprint
        for n in range(1, 101):
            body = upload(client, "busy", base, seed=n)
            assert body["version"] == n
            assert body["versions"] == list(range(max(1, n - KEEP + 1), n + 1))
        assert client.get("/tasks/busy").json()["versions"] == [96, 97, 98, 99, 100]
        one_version = len(prompt_artifact_bytes("busy", base, m=M))
        if backend == "disk":
            task_dir = tmp_path / "store" / "tasks" / "busy"
            expected = ["CURRENT", *(f"v{v}.safetensors" for v in range(96, 101))]
            assert sorted(p.name for p in task_dir.iterdir()) == sorted(expected)
            assert sum(p.stat().st_size for p in task_dir.iterdir()) < (KEEP + 1) * one_version
        else:
            admin = redis.Redis.from_url(request.getfixturevalue("redis_url"))
            keys = {k.decode() for k in admin.keys("softserve:*")}
            k = Keys("softserve")
            blobs = {k.blob("busy", s.decode()) for s in admin.smembers(k.blobs("busy"))}  # type: ignore[union-attr]
            assert keys == {
                k.tasks,
                k.seq("busy"),
                k.current("busy"),
                k.versions("busy"),
                k.blobs("busy"),
                *(k.manifest("busy", v) for v in range(96, 101)),
                *blobs,
            }
            assert len(blobs) == KEEP  # every blob still stored is used by a kept version
            assert sum(int(admin.strlen(b)) for b in blobs) < (KEEP + 1) * one_version
            admin.close()
        r = client.post("/generate", json={"task_id": "busy", "prompt": "hi", "max_new_tokens": 2})
        assert r.status_code == 200 and r.json()["task_version"] == 100


def test_a_pinned_version_survives_pruning_and_finishes_with_its_tokens(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    with live(tmp_path, backend, request) as (client, state):
        base = state.runner.fingerprint
        upload(client, "pin", base, seed=0)
        body = {"task_id": "pin", "prompt": "pinned", "max_new_tokens": 8}
        expected = client.post("/generate", json=body).json()["tokens"]
        lease = state.cache.acquire("pin")  # what a running request holds for its whole life
        assert lease.task.version == 1
        for seed in range(1, 8):
            upload(client, "pin", base, seed=seed)
        assert client.get("/tasks/pin").json()["versions"] == [1, 4, 5, 6, 7, 8]  # 5 newest + the pinned one
        assert state.store.get("pin", 1).version == 1  # another replica could still load it
        task = lease.task
        ids = [int(i) for i in state.runner.tokenizer("pinned")["input_ids"]]
        request_on_v1 = GenerationRequest(ids, SamplingParams(max_new_tokens=8), task=task)
        events = state.engine.generate_sync(request_on_v1, timeout=30)
        assert [e.token_id for e in events if e.token_id is not None] == expected
        assert client.post("/generate", json=body).json()["task_version"] == 8  # new requests: newest
        lease.release()
        upload(client, "pin", base, seed=9)
        assert client.get("/tasks/pin").json()["versions"] == [5, 6, 7, 8, 9]  # released: pruned too


def crash_leftovers(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> Any:
    """Task `a`: v1, v2 current, v3 written but never made current. Task `b`: a first put that never
    got to its flip. Disk also: a half-deleted task and a temp file."""
    a1, a2, a3, b1 = build("a", seed=1), build("a", seed=2), build("a", seed=3), build("b", seed=4)
    if backend == "disk":
        store: Any = DiskStore(tmp_path / "store")
        store.put(a1)
        store.put(a2)
        tasks = tmp_path / "store" / "tasks"
        (tasks / "a" / "v3.safetensors").write_bytes(to_bytes(with_version(a3, 3)))
        (tasks / "a" / ".tmp-half").write_bytes(b"half a file")
        (tasks / "b").mkdir()
        (tasks / "b" / "v1.safetensors").write_bytes(to_bytes(with_version(b1, 1)))
        (tasks / ".deleted-c-1234").mkdir()
        (tasks / ".deleted-c-1234" / "v1.safetensors").write_bytes(b"x")
        return store
    store = RedisStore(request.getfixturevalue("redis_url"))
    store.put(a1)
    store.put(a2)
    admin, k = store.client, store.keys
    for art, version in ((a3, 3), (b1, 1)):  # a writer that died between its write and its flip
        admin.set(k.seq(art.task_id), version)
        store.write_blob(art.task_id, art.sha256, to_bytes(art))
        manifest = json.dumps(with_version(art, version).manifest.to_dict(), sort_keys=True)
        store.write_manifest(art.task_id, version, manifest)
    return store


def test_versions_never_made_current_are_cleaned_at_start(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    store = crash_leftovers(tmp_path, backend, request)
    with threaded_server(tmp_path, store=store) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        assert [t["task_id"] for t in client.get("/tasks").json()["tasks"]] == ["a"]
        assert client.get("/tasks/a").json()["versions"] == [1, 2]
        if backend == "disk":
            tasks = tmp_path / "store" / "tasks"
            assert sorted(p.name for p in tasks.iterdir()) == ["a"]
            assert sorted(p.name for p in (tasks / "a").iterdir()) == [
                "CURRENT",
                "v1.safetensors",
                "v2.safetensors",
            ]
        else:
            k = Keys("softserve")
            keys = {key.decode() for key in store.client.keys("softserve:*")}
            assert not [key for key in keys if key.startswith("softserve:task:b:")]
            assert k.manifest("a", 3) not in keys
            assert k.blob("a", build("a", seed=3).sha256) not in keys
            assert {int(v) for v in store.client.smembers(k.versions("a"))} == {1, 2}
