"""Redis outages against the real app on a tiny model and a real redis-server (stopped by its own PID).

Down at start: the app starts, /healthz 200, /readyz 503, and it becomes ready once Redis appears.
Down mid-run: cached tasks keep serving, uncached ones get 503 + Retry-After; when Redis comes back on
the same port the app recovers by itself (reads, readiness and the change watch), with no restart.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
from api_helpers import prompt_artifact_bytes, serving, upload
from conftest import free_port

from prompt_store import from_bytes
from prompt_store.backends import RedisStore


class PinnedRedis:
    """redis-server on a given port, its RDB in `folder` (so a restart on the same port keeps data)."""

    def __init__(self, port: int, folder: Path) -> None:
        exe = shutil.which("redis-server")
        assert exe is not None, "redis-server is not installed (make test installs it)"
        self.port = port
        args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--maxmemory-policy", "noeviction", "--dir", str(folder), "--dbfilename", "dump.rdb"]
        self.proc = subprocess.Popen([exe, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return
            except OSError:
                assert self.proc.poll() is None, "redis-server exited during start-up"
                assert time.monotonic() < deadline, "redis-server did not start within 10 s"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def wait_for(predicate, timeout: float, what: str) -> float:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, f"{what} not reached within {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - t0


def gen(client, task_id: str) -> httpx.Response:  # type: ignore[no-untyped-def]
    return client.post("/generate", json={"task_id": task_id, "prompt": "hello", "max_new_tokens": 4})


def assert_unavailable(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["type"] == "not_ready" or "redis" in r.json()["error"]["message"]


def test_redis_down_at_start_app_starts_unready_then_recovers(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here yet
    url = f"redis://127.0.0.1:{port}/0"
    with serving(tmp_path, store=RedisStore(url)) as (client, state):
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["store"] is False
        assert_unavailable(gen(client, "anything"))
        assert client.get("/tasks").status_code == 503
        redis = PinnedRedis(port, tmp_path)
        try:
            wait_for(lambda: client.get("/readyz").status_code == 200, 10, "readiness after Redis started")
            r = upload(client, "late", prompt_artifact_bytes("late", state.runner.fingerprint))
            assert r.status_code == 201, r.text
            assert gen(client, "late").status_code == 200
        finally:
            redis.stop()


def test_redis_down_mid_run_cached_serve_uncached_503_then_recovers(tmp_path: Path) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    redis = PinnedRedis(port, tmp_path)
    try:
        with serving(tmp_path, store=RedisStore(url)) as (client, state):
            fp = state.runner.fingerprint
            assert upload(client, "hot", prompt_artifact_bytes("hot", fp, seed=1)).status_code == 201
            before = gen(client, "hot").json()  # now resident in the serving cache
            assert before["task_version"] == 1
            other = RedisStore(url)  # another replica's view of the same Redis
            # written by the other replica, never used here: not loaded (an upload here would warm it)
            assert other.put(from_bytes(prompt_artifact_bytes("cold", fp, seed=2))) == 1
            other.client.save()  # RDB on disk: the restarted server on the same port has the tasks

            redis.stop()
            assert client.get("/healthz").status_code == 200
            assert client.get("/readyz").status_code == 503
            for _ in range(3):
                r = gen(client, "hot")
                assert r.status_code == 200, r.text
                assert r.json()["tokens"] == before["tokens"] and r.json()["task_version"] == 1
            assert_unavailable(gen(client, "cold"))  # known but never loaded: needs the store
            assert_unavailable(gen(client, "never-seen"))
            assert_unavailable(client.get("/tasks/cold"))
            assert state.engine.is_running()

            redis = PinnedRedis(port, tmp_path)  # same port, same data, new process
            wait_for(lambda: client.get("/readyz").status_code == 200, 10, "readiness after Redis returned")
            r = gen(client, "cold")
            assert r.status_code == 200 and r.json()["task_version"] == 1, r.text
            assert gen(client, "never-seen").status_code == 404

            # the change watch reconnected too: a version written by another replica is picked up
            v2 = from_bytes(prompt_artifact_bytes("hot", fp, seed=3))
            assert other.put(v2) == 2
            wait_for(lambda: gen(client, "hot").json().get("task_version") == 2, 10, "watch picked up v2")
            other.close()
    finally:
        redis.stop()
