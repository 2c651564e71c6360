"""Hostile task ids on every route that takes one: 422 before the store is touched; unknown ids are 404
and leave nothing behind (serving cache, memo, metrics labels)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from api_helpers import prompt_artifact_bytes, serving, upload

from prompt_store.backends import DiskStore

BAD_IDS = [
    "../x",
    "%2e%2e%2f",
    "/etc/passwd",
    "a\x00b",
    "a" * 65,
    "tâche",
    "..",
    "a..b",
    "UPPER",
    "x\n",
    " x",
    "x/y",
]


class RecordingStore(DiskStore):
    """A real DiskStore that records every task id it is asked about (before doing anything)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.calls: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def _record(self, name: str, task_id: str) -> None:
        with self._lock:
            self.calls.append((name, task_id))

    def put(self, artifact: Any) -> int:
        self._record("put", artifact.task_id)
        return super().put(artifact)

    def get(self, task_id: str, version: int | None = None) -> Any:
        self._record("get", task_id)
        return super().get(task_id, version)

    def info(self, task_id: str) -> Any:
        self._record("info", task_id)
        return super().info(task_id)

    def delete(self, task_id: str) -> None:
        self._record("delete", task_id)
        super().delete(task_id)


def snapshot(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("bad", BAD_IDS, ids=lambda s: repr(s)[1:-1][:20])
def test_bad_task_id_is_422_on_every_route_before_store_io(tmp_path: Path, bad: str) -> None:
    store = RecordingStore(tmp_path / "store")
    with serving(tmp_path, store=store) as (client, state):
        data = prompt_artifact_bytes("good", state.runner.fingerprint)
        assert upload(client, "good", data).status_code == 201
        store.calls.clear()
        path = "".join(f"%{b:02X}" for b in bad.encode())  # every byte encoded: no client normalising
        files_before = snapshot(tmp_path / "store")
        files = {"file": ("a.safetensors", data, "application/octet-stream")}
        responses = {
            "GET /tasks/{id}": client.get(f"/tasks/{path}"),
            "DELETE /tasks/{id}": client.delete(f"/tasks/{path}"),
            "PUT /tasks/{id}": client.put(f"/tasks/{path}", files=files),
            "POST /tasks/{id}/compress": client.post(
                f"/tasks/{path}/compress", json={"gist_task": "good", "instruction": "hi"}
            ),
            "compress gist_task": client.post(
                "/tasks/new/compress", json={"gist_task": bad, "instruction": "hi"}
            ),
            "POST /generate": client.post("/generate", json={"task_id": bad, "prompt": "hi"}),
            "POST /v1/completions": client.post("/v1/completions", json={"model": bad, "prompt": "hi"}),
            "POST /v1/chat/completions": client.post(
                "/v1/chat/completions", json={"model": bad, "messages": [{"role": "user", "content": "hi"}]}
            ),
        }
        for route, r in responses.items():
            assert r.status_code == 422, f"{route} with {bad!r}: {r.status_code} {r.text[:200]}"
        assert store.calls == [], f"the store was asked: {store.calls}"
        assert [t.task_id for t in store.list()] == ["good"]
        assert snapshot(tmp_path / "store") == files_before


def test_unknown_tasks_are_404_and_leave_nothing_behind(tmp_path: Path) -> None:
    with serving(tmp_path) as (client, state):
        data = prompt_artifact_bytes("known", state.runner.fingerprint)
        assert upload(client, "known", data).status_code == 201
        warm = client.post("/generate", json={"task_id": "known", "prompt": "hi", "max_new_tokens": 2})
        assert warm.status_code == 200
        before = state.cache.stats()
        prefixes_before = len(state.engine.prefix_cache)
        for i in range(200):
            missing = f"nope-{i}"
            assert client.post("/generate", json={"task_id": missing, "prompt": "hi"}).status_code == 404
            assert client.post("/v1/completions", json={"model": missing, "prompt": "hi"}).status_code == 404
            assert client.get(f"/tasks/{missing}").status_code == 404
        after = state.cache.stats()
        assert (after["entries"], after["tasks"], after["bytes"]) == (
            before["entries"],
            before["tasks"],
            before["bytes"],
        )
        assert len(state.engine.prefix_cache) == prefixes_before
        assert "nope-" not in client.get("/metrics").text  # no per-task label series for unknown ids
