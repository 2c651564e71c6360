"""POST /tasks/{id}/rollback: an older version's content becomes current again, as a new version."""

from __future__ import annotations

from pathlib import Path

from api_helpers import prompt_artifact_bytes, serving, upload

ADMIN = "rollback-admin-key-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


def generate(client, task_id: str) -> tuple[str, int]:  # type: ignore[no-untyped-def]
    r = client.post("/generate", json={"task_id": task_id, "prompt": "hello", "max_new_tokens": 6})
    assert r.status_code == 200, r.text
    return r.json()["text"], r.json()["task_version"]


def test_rollback_serves_the_old_content_as_a_new_version(tmp_path: Path) -> None:
    with serving(tmp_path, admin_key=ADMIN) as (client, state):
        fp = state.runner.fingerprint
        assert upload(client, "t", prompt_artifact_bytes("t", fp, seed=1), AUTH).status_code == 201
        first = generate(client, "t")
        assert upload(client, "t", prompt_artifact_bytes("t", fp, seed=2), AUTH).status_code == 201
        second = generate(client, "t")
        assert first[1] == 1 and second[1] == 2 and first[0] != second[0]
        r = client.post("/tasks/t/rollback", headers=AUTH)  # no body: the content before the current
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["version"] == 3 and body["restored_version"] == 1 and body["versions"] == [1, 2, 3]
        assert body["sha256"] == state.store.get("t", 1).sha256
        assert generate(client, "t") == (first[0], 3)  # this replica serves it at once, same output
        r = client.post("/tasks/t/rollback", json={"version": 2}, headers=AUTH)
        assert r.status_code == 201 and r.json()["version"] == 4 and r.json()["restored_version"] == 2
        assert generate(client, "t") == (second[0], 4)


def test_rollback_refusals_name_the_problem(tmp_path: Path) -> None:
    with serving(tmp_path, admin_key=ADMIN, keep_versions=2) as (client, state):
        fp = state.runner.fingerprint
        assert upload(client, "t", prompt_artifact_bytes("t", fp, seed=1), AUTH).status_code == 201
        r = client.post("/tasks/t/rollback", headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["field"] == "version", r.text
        assert "no older content" in r.json()["error"]["message"]
        for seed in (2, 3):
            assert upload(client, "t", prompt_artifact_bytes("t", fp, seed=seed), AUTH).status_code == 201
        assert state.store.info("t").versions == (2, 3)  # version 1 pruned (keep_versions=2)
        r = client.post("/tasks/t/rollback", json={"version": 1}, headers=AUTH)
        assert r.status_code == 404 and "no version 1" in r.text and "2, 3" in r.text
        r = client.post("/tasks/t/rollback", json={"version": 3}, headers=AUTH)
        assert r.status_code == 400 and "already current" in r.text
        for bad in ({"version": 0}, {"version": "two"}, {"version": 2, "force": True}):
            r = client.post("/tasks/t/rollback", json=bad, headers=AUTH)
            assert r.status_code == 422, (bad, r.text)
        assert client.post("/tasks/nope/rollback", headers=AUTH).status_code == 404
        assert client.post("/tasks/t/rollback", json={"version": 2}).status_code == 401
        r = client.post("/tasks/t/rollback", json={"version": 2}, headers={"Authorization": "Bearer x" * 3})
        assert r.status_code == 401
        assert state.store.info("t").version == 3  # nothing above changed anything
