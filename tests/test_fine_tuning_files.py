"""/v1/files and job creation checks, in process (no worker runs here: SOFTSERVE_EMBEDDED_WORKER off)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from api_helpers import serving
from fastapi.testclient import TestClient
from ft_helpers import chat_lines, method

ADMIN = "fine-tune-admin-key-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


def upload(
    client: TestClient, data: bytes, headers: dict[str, str] | None = None, purpose: str = "fine-tune"
) -> Any:
    files = {"file": ("train.jsonl", data, "application/jsonl")}
    return client.post(
        "/v1/files", files=files, data={"purpose": purpose}, headers=AUTH if headers is None else headers
    )


def test_files_are_validated_stored_listed_read_and_deleted(tmp_path: Path) -> None:
    pc = b'{"prompt": "2+2=", "completion": "4"}\n\n{"prompt": "3+3=", "completion": "6"}\n'
    with serving(tmp_path, admin_key=ADMIN, embedded_worker=False) as (client, _):
        chat = upload(client, chat_lines(3))
        assert chat.status_code == 200, chat.text
        meta = chat.json()
        assert meta["object"] == "file" and meta["purpose"] == "fine-tune" and meta["lines"] == 3
        pc_meta = upload(client, pc).json()
        assert pc_meta["lines"] == 2  # the prompt/completion form; blank lines skipped
        # stored in the store's backend (on disk beside the artifacts), not in memory
        assert (tmp_path / "store" / "files" / f"{meta['id']}.data").read_bytes() == chat_lines(3)
        listed = client.get("/v1/files").json()["data"]
        assert sorted(f["id"] for f in listed) == sorted([meta["id"], pc_meta["id"]])
        assert client.get(f"/v1/files/{meta['id']}").json() == meta
        assert client.get(f"/v1/files/{meta['id']}/content").content == chat_lines(3)
        assert client.delete(f"/v1/files/{meta['id']}", headers=AUTH).json()["deleted"] is True
        gone = client.get(f"/v1/files/{meta['id']}")
        assert gone.status_code == 404 and gone.json()["error"]["param"] == "file_id"


def test_a_bad_file_is_refused_with_its_line_and_reason(tmp_path: Path) -> None:
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "A"}]})
    no_target = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})
    cases = {
        f"{good}\n{good}\n{{not json\n".encode(): "line 3: invalid JSON",
        f"{good}\n{no_target}\n".encode(): "line 2: the last message must be the assistant's",
        f'{good}\n{{"text": "x"}}\n'.encode(): 'line 2: expected {"messages"',
        b'{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}': (
            "line 1: messages[0].role must be one of"
        ),
        b"\n\n": "the file holds no examples",
    }
    with serving(tmp_path, admin_key=ADMIN, embedded_worker=False) as (client, _):
        for data, message in cases.items():
            r = upload(client, data)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == "file" and message in r.json()["error"]["message"], r.text
        assert client.get("/v1/files").json()["data"] == []  # nothing refused was stored
        r = upload(client, chat_lines(1), purpose="assistants")
        assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"


def test_file_size_and_line_limits_come_from_settings(tmp_path: Path) -> None:
    with serving(tmp_path, admin_key=ADMIN, embedded_worker=False, file_max_bytes=2048, file_max_lines=3) as (
        client,
        _,
    ):
        big = upload(client, chat_lines(40))
        assert big.status_code == 422
        assert "2048 bytes" in big.json()["error"]["message"] and big.json()["error"]["param"] == "file"
        many = upload(client, chat_lines(4))
        assert many.status_code == 400
        assert "line 4: more than 3 examples (SOFTSERVE_FILE_MAX_LINES)" in many.json()["error"]["message"]
        assert upload(client, chat_lines(3)).status_code == 200


def test_writes_need_the_admin_key(tmp_path: Path) -> None:
    with serving(tmp_path, admin_key=ADMIN, embedded_worker=False) as (client, _):
        assert upload(client, chat_lines(2), headers={}).status_code == 401
        file_id = upload(client, chat_lines(2)).json()["id"]
        body = {"model": "base", "training_file": file_id, "suffix": "t1"}
        assert client.post("/v1/fine_tuning/jobs", json=body).status_code == 401
        assert client.delete(f"/v1/files/{file_id}").status_code == 401
        job = client.post("/v1/fine_tuning/jobs", json=body, headers=AUTH).json()
        assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 401
        assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").status_code == 200  # reads: the API key rule


def test_job_create_refuses_bad_fields_by_name(tmp_path: Path) -> None:
    with serving(tmp_path, embedded_worker=False, max_virtual_tokens=16) as (client, state):
        file_id = upload(client, chat_lines(2)).json()["id"]

        def create(**changes: Any) -> Any:
            body = {"model": "base", "training_file": file_id, "suffix": "ok", **changes}
            return client.post("/v1/fine_tuning/jobs", json=body)

        for changes, status, param, text in [
            ({"model": "gpt-4o-mini"}, 400, "model", "not the served base model"),
            ({"suffix": "Bad Name"}, 400, "suffix", "must match"),
            ({"suffix": "base"}, 400, "suffix", "base"),
            ({"training_file": "file-missing"}, 400, "training_file", "no file"),
            ({"method": {"type": "lora"}}, 422, "method.type", ""),
            (
                {"method": method(5) | {"prompt_tuning": {"hyperparameters": {"dropout": 0.1}}}},
                422,
                None,
                "dropout",
            ),
            (
                {"method": method(5, m=17)},
                422,
                "method.hyperparameters.num_virtual_tokens",
                "over the limit 16",
            ),
            (
                {"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}},
                422,
                None,
                "n_epochs",
            ),
        ]:
            r = create(**changes)
            assert r.status_code == status, (changes, r.text)
            error = r.json()["error"]
            assert param is None or error["param"] == param, (changes, error)
            assert text in error["message"], (changes, error)
        assert client.get("/v1/fine_tuning/jobs").json()["data"] == []
        ok = create(model=state.runner.name, method={"type": "supervised"})  # the base by its name too
        assert ok.status_code == 200 and ok.json()["method"]["type"] == "prompt_tuning"


def test_queue_limit_429_cancel_of_a_waiting_job_and_list_pages(tmp_path: Path) -> None:
    with serving(tmp_path, embedded_worker=False, max_queued_jobs=2) as (client, _):
        file_id = upload(client, chat_lines(2)).json()["id"]
        body = {"model": "base", "training_file": file_id, "method": method(3)}
        first, second = (
            client.post("/v1/fine_tuning/jobs", json=body | {"suffix": s}).json() for s in ("a", "b")
        )
        assert first["status"] == second["status"] == "queued"
        full = client.post("/v1/fine_tuning/jobs", json=body | {"suffix": "c"})
        assert full.status_code == 429 and "SOFTSERVE_MAX_QUEUED_JOBS=2" in full.json()["error"]["message"]
        assert full.headers["Retry-After"]
        cancelled = client.post(f"/v1/fine_tuning/jobs/{first['id']}/cancel").json()
        assert cancelled["status"] == "cancelled" and cancelled["finished_at"]  # never started: at once
        assert client.post("/v1/fine_tuning/jobs", json=body | {"suffix": "c"}).status_code == 200
        page1 = client.get("/v1/fine_tuning/jobs", params={"limit": 2}).json()
        assert [j["suffix"] for j in page1["data"]] == ["c", "b"] and page1["has_more"]
        page2 = client.get("/v1/fine_tuning/jobs", params={"after": page1["data"][-1]["id"]}).json()
        assert [j["suffix"] for j in page2["data"]] == ["a"] and not page2["has_more"]
        events = client.get(f"/v1/fine_tuning/jobs/{first['id']}/events").json()["data"]
        assert events[0]["message"] == "cancelled before it started"  # newest first
        assert client.get("/v1/fine_tuning/jobs/ftjob-nope").status_code == 404


def test_the_server_never_imports_the_trainers_through_jobs() -> None:
    """Only jobs/worker.py imports `training`, and no server module imports jobs.worker."""
    import ast

    root = Path(__file__).resolve().parent.parent

    def imports(path: Path) -> set[str]:
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:  # `from jobs import worker` too
                names.update({node.module, *(f"{node.module}.{a.name}" for a in node.names)})
        return names

    jobs_modules = {p.name: imports(p) for p in (root / "jobs").glob("*.py")}
    assert {n for n, mods in jobs_modules.items() if any(m.split(".")[0] == "training" for m in mods)} == {
        "worker.py"
    }
    server_imports = set().union(*(imports(p) for p in (root / "server").rglob("*.py")))
    assert "jobs.worker" not in server_imports and {"jobs.records", "jobs.queue"} <= server_imports
