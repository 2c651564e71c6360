"""PUT and DELETE of one task hammered from threads over real HTTP (uvicorn), on disk and on Redis.

Every PUT either succeeds and says so (201 with the version it created), or leaves nothing behind; every
DELETE is 204 or 404; no request is a 5xx. Afterwards the store is consistent (every listed version is whole,
nothing that no version uses is left), and a last DELETE leaves no file and no key at all.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from api_helpers import prompt_artifact_bytes
from live_server import threaded_server
from upload_helpers import put_files

from prompt_store import Fingerprint
from prompt_store.backends import DiskStore, RedisStore, Store
from prompt_store.backends.redis_store import Keys

WRITERS, PUTS_EACH = 4, 12
DELETERS, DELETES_EACH = 2, 20
TASK = "race"


def hammer(url: str, base: Fingerprint) -> tuple[list[httpx.Response], list[httpx.Response]]:
    puts: list[httpx.Response] = []
    deletes: list[httpx.Response] = []
    lock = threading.Lock()
    start = threading.Barrier(WRITERS + DELETERS)

    def writer(w: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            start.wait()
            for i in range(PUTS_EACH):
                data = prompt_artifact_bytes(TASK, base, seed=100 * w + i)
                r = put_files(client, TASK, [("a.safetensors", data)])
                with lock:
                    puts.append(r)

    def deleter(d: int) -> None:
        rng = random.Random(d)
        with httpx.Client(base_url=url, timeout=60) as client:
            start.wait()
            for _ in range(DELETES_EACH):
                r = client.delete(f"/tasks/{TASK}")
                with lock:
                    deletes.append(r)
                threading.Event().wait(rng.uniform(0.0, 0.03))

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
    threads += [threading.Thread(target=deleter, args=(d,)) for d in range(DELETERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return puts, deletes


def assert_consistent(store: Store, backend: str, root: Path, admin: redis.Redis | None) -> None:
    """Whatever survived is whole: every version listed loads; nothing lies around that no version uses."""
    try:
        info = store.info(TASK)
    except Exception:  # noqa: BLE001 - gone: then nothing of it may be left
        info = None
    if info is None:
        assert_nothing_left(backend, root, admin)
        return
    for version in info.versions:
        assert store.get(TASK, version).version == version
    if backend == "disk":
        names = sorted(p.name for p in (root / "tasks" / TASK).iterdir())
        assert names == sorted(["CURRENT", *(f"v{v}.safetensors" for v in info.versions)])
        assert not [p for p in (root / "tasks").iterdir() if p.name.startswith(".")]  # no tombstone
    else:
        assert admin is not None
        k = Keys("softserve")
        shas = {m.decode() for m in admin.smembers(k.blobs(TASK))}  # type: ignore[union-attr]
        used = {store.get(TASK, v).sha256 for v in info.versions}
        assert shas == used
        assert {int(v) for v in admin.smembers(k.versions(TASK))} == set(info.versions)  # type: ignore[union-attr]


def assert_nothing_left(backend: str, root: Path, admin: redis.Redis | None) -> None:
    if backend == "disk":
        assert list((root / "tasks").iterdir()) == []
        assert list((root / "locks").iterdir()) == []
    else:
        assert admin is not None and admin.keys("softserve:*") == []


@pytest.mark.parametrize("backend", ["disk", "redis"])
def test_put_under_concurrent_delete_succeeds_or_leaves_nothing(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    admin: redis.Redis | None = None
    root = tmp_path / "store"
    store: Any
    if backend == "redis":
        url = request.getfixturevalue("redis_url")
        admin, store = redis.Redis.from_url(url), RedisStore(url)
    else:
        store = DiskStore(root)
    with threaded_server(tmp_path, store=store, keep_versions=3) as (url, state):
        puts, deletes = hammer(url, state.runner.fingerprint)
        assert len(puts) == WRITERS * PUTS_EACH and len(deletes) == DELETERS * DELETES_EACH
        for r in puts:
            assert r.status_code == 201, (r.status_code, r.text[:300])  # it succeeded, and says so
            body = r.json()
            # the version this PUT created; `versions` is what the task holds by the time it answers
            assert body["task_id"] == TASK and body["version"] >= 1
        assert {r.status_code for r in deletes} <= {204, 404}, [r.text[:200] for r in deletes]
        assert sum(r.status_code == 204 for r in deletes) >= 1
        assert_consistent(store, backend, root, admin)
        with httpx.Client(base_url=url, timeout=30) as client:
            r = put_files(
                client, TASK, [("a.safetensors", prompt_artifact_bytes(TASK, state.runner.fingerprint))]
            )
            assert r.status_code == 201
            assert client.get(f"/tasks/{TASK}").json()["version"] == r.json()["version"]
            assert client.delete(f"/tasks/{TASK}").status_code == 204
        assert_nothing_left(backend, root, admin)
    if admin is not None:
        admin.close()
