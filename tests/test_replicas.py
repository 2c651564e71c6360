"""Two real `softserve serve` processes on one real Redis: an upload through one is served by the other."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from api_helpers import VOCAB, prompt_artifact_bytes
from conftest import tiny_llama
from live_server import ServerProcess, save_tiny_model

from prompt_store import Fingerprint


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Fingerprint]:
    folder = save_tiny_model(tmp_path_factory.mktemp("tiny-model"))
    return folder, Fingerprint.from_model(tiny_llama(seed=0, vocab_size=VOCAB), str(folder))


@pytest.fixture()
def two_replicas(tiny_model_dir, redis_url: str, tmp_path: Path) -> Iterator[tuple[str, str, Fingerprint]]:  # type: ignore[no-untyped-def]
    folder, fingerprint = tiny_model_dir
    env = {"SOFTSERVE_LOG_LEVEL": "WARNING"}
    servers = [ServerProcess(folder, redis_url, tmp_path / f"server{i}.log", **env) for i in range(2)]
    try:
        for server in servers:
            server.wait_ready()
        yield servers[0].url, servers[1].url, fingerprint
    finally:
        for server in servers:
            server.stop()


def served_version(url: str, task_id: str) -> int | None:
    r = httpx.post(
        f"{url}/generate", json={"task_id": task_id, "prompt": "hi", "max_new_tokens": 1}, timeout=10
    )
    return int(r.json()["task_version"]) if r.status_code == 200 else None


def wait_for_version(url: str, task_id: str, version: int, limit_s: float) -> float:
    """Seconds from now until a request *sent* then is served `version`: the probe's own generation time
    (slow on a loaded CPU) is not propagation time; counting it made this fail when the machine was busy."""
    t0 = time.monotonic()
    while (sent := time.monotonic() - t0) < limit_s:
        if served_version(url, task_id) == version:
            return sent
        time.sleep(0.02)
    raise AssertionError(f"{url} did not serve {task_id} v{version} to a request sent within {limit_s} s")


def test_upload_on_one_replica_is_served_by_the_other_within_1s(two_replicas) -> None:  # type: ignore[no-untyped-def]
    a, b, fp = two_replicas
    for version, seed in ((1, 1), (2, 2), (3, 3)):
        files = {"file": ("t.safetensors", prompt_artifact_bytes("shared", fp, seed=seed))}
        r = httpx.put(f"{a}/tasks/shared", files=files, timeout=30)
        assert r.status_code == 201, r.text
        assert r.json()["version"] == version
        elapsed = wait_for_version(b, "shared", version, limit_s=1.0)
        assert elapsed < 1.0
    assert httpx.delete(f"{a}/tasks/shared", timeout=10).status_code == 204
    t0 = time.monotonic()
    while (sent := time.monotonic() - t0) < 1.0 and served_version(b, "shared") is not None:
        time.sleep(0.02)
    assert sent < 1.0, "a request sent 1 s after the delete was still served the deleted task"


def test_cli_manages_tasks_on_a_running_server(two_replicas, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a, b, fp = two_replicas
    artifact = tmp_path / "cli-task.safetensors"
    artifact.write_bytes(prompt_artifact_bytes("cli-task", fp))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "server.cli", "tasks", "--url", a, *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    pushed = cli("push", "cli-task", str(artifact))
    assert pushed.returncode == 0, pushed.stderr
    assert "version 1 is current" in pushed.stdout
    listed = cli("list")
    assert listed.returncode == 0 and "cli-task" in listed.stdout
    missing = cli("show", "no-such-task")
    assert missing.returncode == 1 and "404" in missing.stderr
    assert cli("delete", "cli-task").returncode == 0
    assert "cli-task" not in cli("list").stdout
