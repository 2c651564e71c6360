"""A full store is named: 507 with a message, no version burnt, the previous version keeps serving, and
/readyz reports `store_writable: false` (still ready: serving needs no writes). Real uvicorn, a real full
disk (a tmpfs of a few MiB, filled up) and a real full Redis (maxmemory + noeviction, filled up).
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis
from api_helpers import prompt_artifact_bytes
from conftest import RedisServer
from live_server import threaded_server
from upload_helpers import put_files

from prompt_store.backends import DiskStore, RedisStore
from prompt_store.backends.redis_store import Keys


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real size-limited file system (mount needs root, which `make test` has: it apt-installs Redis)."""
    path.mkdir(parents=True)
    if os.geteuid() != 0:
        raise RuntimeError("this test mounts a small tmpfs to fill a disk for real; run it as root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(folder: Path) -> Path:
    """Write a filler file until the file system is full (ENOSPC); returns it."""
    filler = folder / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def readyz(client: httpx.Client) -> dict[str, bool]:
    r = client.get("/readyz")
    assert r.status_code == 200, r.text  # still ready: every stored task serves
    checks: dict[str, bool] = r.json()["checks"]
    return checks


def assert_full_upload_changes_nothing(client: httpx.Client, base: object) -> None:
    before = client.get("/tasks/t").json()
    r = put_files(client, "t", [("t.safetensors", prompt_artifact_bytes("t", base, m=256, seed=2))])  # type: ignore[arg-type]
    assert r.status_code == 507, r.text
    error = r.json()["error"]
    assert (
        error["type"] == "store_full"
        and "full" in error["message"]
        and "nothing was written" in error["message"]
    )
    assert client.get("/tasks/t").json() == before
    served = client.post("/generate", json={"task_id": "t", "prompt": "hello", "max_new_tokens": 3})
    assert served.status_code == 200 and served.json()["task_version"] == 1
    assert readyz(client)["store_writable"] is False
    # a brand-new task refused for want of space leaves nothing behind either
    assert (
        put_files(
            client, "fresh", [("f.safetensors", prompt_artifact_bytes("fresh", base, m=256))]
        ).status_code
        == 507
    )  # type: ignore[arg-type]
    assert client.get("/tasks/fresh").status_code == 404


def test_a_full_disk_is_507_and_burns_nothing(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "store", "2m") as root:
        store = DiskStore(root)
        with (
            threaded_server(tmp_path, store=store) as (url, state),
            httpx.Client(base_url=url, timeout=30) as c,
        ):
            base = state.runner.fingerprint
            assert put_files(c, "t", [("t.safetensors", prompt_artifact_bytes("t", base))]).status_code == 201
            assert readyz(c)["store_writable"] is True
            filler = fill(root)
            assert_full_upload_changes_nothing(c, base)
            leftovers = sorted(p.name for p in (root / "tasks" / "t").iterdir())
            assert leftovers == ["CURRENT", "v1.safetensors"]  # no v2, no temp file
            assert not (root / "tasks" / "fresh").exists() and not (root / "locks" / "fresh.lock").exists()
            filler.unlink()
            assert readyz(c)["store_writable"] is True
            r = put_files(c, "t", [("t.safetensors", prompt_artifact_bytes("t", base, m=256, seed=2))])
            assert r.status_code == 201 and r.json()["version"] == 2  # the number was not burnt


@pytest.fixture()
def small_redis() -> Iterator[RedisServer]:
    server = RedisServer()  # its own process: the session's Redis keeps its unlimited memory
    yield server
    server.stop()


def fill_redis(admin: redis.Redis) -> int:
    """Set maxmemory a little above what is used, then write filler keys until Redis refuses (OOM)."""
    used = int(admin.info("memory")["used_memory"])
    admin.config_set("maxmemory", used + 2_000_000)
    n = 0
    while True:
        try:
            admin.set(f"filler:{n}", b"\0" * 65536)
        except redis.exceptions.ResponseError as exc:
            assert "maxmemory" in str(exc), exc
            return n
        n += 1


def test_a_full_redis_is_507_and_burns_nothing(tmp_path: Path, small_redis: RedisServer) -> None:
    admin = redis.Redis.from_url(small_redis.url)
    assert admin.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    store = RedisStore(small_redis.url)
    with threaded_server(tmp_path, store=store) as (url, state), httpx.Client(base_url=url, timeout=30) as c:
        base = state.runner.fingerprint
        assert put_files(c, "t", [("t.safetensors", prompt_artifact_bytes("t", base))]).status_code == 201
        assert readyz(c)["store_writable"] is True
        fillers = fill_redis(admin)
        task_keys = sorted(admin.keys("softserve:*"))
        assert_full_upload_changes_nothing(c, base)
        assert sorted(admin.keys("softserve:*")) == task_keys  # nothing written, nothing half-written
        assert int(admin.get(Keys("softserve").seq("t")) or 0) == 1
        admin.delete(*[f"filler:{i}" for i in range(fillers)])
        assert readyz(c)["store_writable"] is True
        r = put_files(c, "t", [("t.safetensors", prompt_artifact_bytes("t", base, m=256, seed=2))])
        assert r.status_code == 201 and r.json()["version"] == 2  # the number was not burnt
    admin.close()
