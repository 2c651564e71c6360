"""Scale-out: a server without an embedded worker and two `python -m jobs.worker` processes on one real
redis-server (the queue, the job records and the artifacts all in it). Ordering first; kill -9 last."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import RedisServer
from ft_helpers import (
    HEARTBEAT_TIMEOUT_S,
    chat_lines,
    method,
    start_worker,
    stop_worker,
    wait_for,
    worker_env,
)
from live_server import save_tiny_model, threaded_server

from jobs.backend import RedisJobs
from prompt_store import NotFound
from prompt_store.backends import RedisStore
from runtime.model_runner import load_model

LONG = 100_000


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> Iterator[tuple[httpx.Client, RedisStore, RedisJobs, list[subprocess.Popen[bytes]]]]:
    import redis

    redis.Redis.from_url(redis_server.url).flushdb()
    tmp = tmp_path_factory.mktemp("ft-redis")
    model_dir = save_tiny_model(tmp / "model")
    env = worker_env(model_dir, redis_server.url, tmp / "work")
    logs = [tmp / f"worker{i}.log" for i in range(2)]
    workers = [start_worker(env, log) for log in logs]
    # both consume before any job is queued: the ordering test needs one job on each
    wait_for(lambda: all(" ready: " in log.read_text() for log in logs), "both workers to start", 120)
    store = RedisStore(redis_server.url)
    settings = {
        "model": str(model_dir),
        "store_spec": redis_server.url,
        "device": "cpu",
        "dtype": "float32",
        "embedded_worker": False,
        "job_heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S,
    }
    runner = load_model(str(model_dir), dtype="float32", device="cpu")
    try:
        with (
            threaded_server(tmp, store=store, runner=runner, **settings) as (url, _),
            httpx.Client(base_url=url, timeout=30) as client,
        ):
            yield client, store, RedisJobs(redis_server.url), workers
    finally:
        for proc in workers:
            stop_worker(proc)


def create(client: httpx.Client, suffix: str, steps: int, n: int = 8) -> dict[str, Any]:
    files = {"file": ("t.jsonl", chat_lines(n), "application/jsonl")}
    file_id = client.post("/v1/files", files=files, data={"purpose": "fine-tune"}).json()["id"]
    body = {"model": "base", "training_file": file_id, "suffix": suffix, "method": method(steps)}
    r = client.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 200, r.text
    job: dict[str, Any] = r.json()
    return job


def job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    found: dict[str, Any] = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    return found


def ended(client: httpx.Client, job_id: str, timeout: float = 300) -> dict[str, Any]:
    found: dict[str, Any] = wait_for(
        lambda: (j := job(client, job_id))["status"] in ("succeeded", "failed", "cancelled") and j,
        f"job {job_id} to end",
        timeout,
    )
    return found


def test_two_jobs_for_one_task_publish_in_creation_order(cluster: Any) -> None:
    client, store, jobs, _ = cluster
    first = create(client, "ordered", steps=80)  # still training when the second (1 step) has finished
    wait_for(lambda: job(client, first["id"])["progress"]["step"] >= 1, "the first job to train", 120)
    second = create(client, "ordered", steps=1)  # the other worker: it finishes training first
    wait_for(lambda: job(client, second["id"])["status"] == "running", "the second job to start", 120)
    a, b = ended(client, first["id"]), ended(client, second["id"])
    assert a["status"] == b["status"] == "succeeded", (a, b)
    assert jobs.get_job(a["id"])["worker"] != jobs.get_job(b["id"])["worker"]  # ran side by side
    assert jobs.file_bytes(a["training_file"]) == chat_lines(8)  # files live in the store's Redis too
    assert a["version"] < b["version"]  # the later job's artifact is the newer version
    assert store.info("ordered").version == b["version"]
    waits = [e["message"] for e in client.get(f"/v1/fine_tuning/jobs/{b['id']}/events").json()["data"]]
    assert any(m.startswith("waiting for earlier jobs of 'ordered'") for m in waits)


def test_kill9_of_one_worker_fails_its_job_and_the_other_worker_runs_on(cluster: Any) -> None:
    client, store, jobs, workers = cluster
    victim = create(client, "victim", steps=LONG)
    wait_for(lambda: job(client, victim["id"])["progress"]["step"] >= 1, "the job to train", 120)
    pid = int(jobs.get_job(victim["id"])["worker"].rsplit(":", 1)[1])
    assert pid in [w.pid for w in workers]
    os.kill(pid, signal.SIGKILL)
    failed = ended(client, victim["id"], timeout=HEARTBEAT_TIMEOUT_S + 20)
    assert failed["status"] == "failed" and failed["error"]["code"] == "worker_lost"
    assert f"no heartbeat for {HEARTBEAT_TIMEOUT_S:g} s" in failed["error"]["message"]
    with pytest.raises(NotFound):
        store.info("victim")  # no partial artifact
    survivor = create(client, "survivor", steps=2)
    assert ended(client, survivor["id"])["status"] == "succeeded"
    assert int(jobs.get_job(survivor["id"])["worker"].rsplit(":", 1)[1]) != pid


def test_sigterm_of_a_worker_fails_its_running_job_at_once(cluster: Any) -> None:
    client, store, jobs, workers = cluster
    job_id = create(client, "stopped", steps=LONG)["id"]
    wait_for(lambda: job(client, job_id)["progress"]["step"] >= 1, "the job to train", 120)
    pid = int(jobs.get_job(job_id)["worker"].rsplit(":", 1)[1])
    proc = next(w for w in workers if w.pid == pid)
    proc.terminate()
    assert proc.wait(15) == 0
    failed = job(client, job_id)  # no heartbeat timeout to wait for: failed before the process exited
    assert failed["status"] == "failed" and failed["error"]["code"] == "worker_stopped", failed
    with pytest.raises(NotFound):
        store.info("stopped")
