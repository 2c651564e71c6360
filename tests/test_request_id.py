"""X-Request-ID on every response (client ids echoed when sane, replaced when hostile), and the same id on
the log lines of that request: uvicorn's access line, the upload/compress/delete lines (task, version,
method, bytes, sha256 prefix) and the engine thread's lines about the request.

Real uvicorn: in a thread for the headers, and `softserve serve` as a subprocess for the logs, so the
handler, format and filter are the ones an operator gets.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from api_helpers import prompt_artifact_bytes, tiny_runner
from fastapi import FastAPI
from fastapi.testclient import TestClient
from live_server import ServerProcess, save_tiny_model, threaded_server

from prompt_store import Fingerprint, make_artifact, to_bytes
from prompt_store.backends import DiskStore
from server.app import create_app
from server.request_id import VALID_ID, accept_or_generate
from server.settings import Settings

ADMIN = "admin-key-for-request-ids-01"
MAX_BODY = 64 * 1024
GENERATED = re.compile(r"[0-9a-f]{32}")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Fingerprint]]:
    tmp = tmp_path_factory.mktemp("request-ids")
    with threaded_server(tmp, admin_key=ADMIN, max_body_bytes=MAX_BODY) as (url, state):
        yield url, state.runner.fingerprint


def upload_files(task: str, base: Fingerprint, seed: int = 0) -> dict[str, tuple[str, bytes, str]]:
    data = prompt_artifact_bytes(task, base, seed=seed)
    return {"file": (f"{task}.safetensors", data, "application/octet-stream")}


def generated_id(response: httpx.Response) -> str:
    value = response.headers.get("x-request-id")
    assert value is not None, f"{response.status_code} {response.request.url} has no X-Request-ID"
    assert GENERATED.fullmatch(value), value
    return value


def test_sane_ids_are_kept_and_anything_else_is_replaced() -> None:
    for sane in ("abc", "A.b-c_9", "x" * 128, "4bf92f3577b34da6a3ce929d0e0e4736"):
        assert accept_or_generate(sane) == sane
    for hostile in ("", "x" * 129, "x" * 1000, "a\nb", "a\r\nX-Admin: 1", "a b", "é", "a;b", "a/b", None):
        replaced = accept_or_generate(hostile)
        assert replaced != hostile and VALID_ID.fullmatch(replaced) and GENERATED.fullmatch(replaced)


def test_every_response_carries_a_request_id(live: tuple[str, Fingerprint]) -> None:
    url, base = live
    admin = {"Authorization": f"Bearer {ADMIN}"}
    seen: set[str] = set()
    with httpx.Client(base_url=url, timeout=30) as client:
        responses = [
            (200, client.get("/healthz")),
            (200, client.get("/metrics")),
            (201, client.put("/tasks/t", files=upload_files("t", base), headers=admin)),
            (200, client.post("/generate", json={"task_id": "t", "prompt": "hi", "max_new_tokens": 2})),
            (422, client.post("/generate", json={"prompt": "hi", "max_new_tokens": -1})),
            (404, client.get("/no-such-route")),
            (404, client.post("/generate", json={"task_id": "missing", "prompt": "hi"})),
            (401, client.delete("/tasks/t")),  # no admin key
            (401, client.put("/tasks/u", files=upload_files("u", base))),  # refused by the auth gate
            (413, client.put("/tasks/u", content=b"x" * (MAX_BODY + 1), headers=admin)),  # body limit
            (405, client.patch("/tasks/t")),
        ]
        body = {"prompt": "hi", "max_new_tokens": 3, "stream": True}
        with client.stream("POST", "/generate", json=body) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            stream.read()
            responses.append((200, stream))
    for status, response in responses:
        assert response.status_code == status, (response.request.url, response.text[:200])
        seen.add(generated_id(response))
    assert len(seen) == len(responses)  # one new id per request


def test_client_ids_are_echoed_and_hostile_ones_replaced(live: tuple[str, Fingerprint]) -> None:
    url, _ = live
    with httpx.Client(base_url=url, timeout=30) as client:
        for sane in ("req-42", "trace.0001_A", "z" * 128):
            assert client.get("/healthz", headers={"X-Request-ID": sane}).headers["x-request-id"] == sane
            r = client.post(
                "/generate", json={"prompt": "hi", "max_new_tokens": 1}, headers={"X-Request-ID": sane}
            )
            assert r.status_code == 200 and r.headers["x-request-id"] == sane
        for hostile in ("z" * 129, "y" * 1000, "has space", 'quote"d', "tab\there"):
            r = client.get("/healthz", headers={"X-Request-ID": hostile})
            assert generated_id(r) != hostile
    # a raw newline cannot be sent in a header; sent percent-encoded, or as a second id, it is not echoed
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: evil%0Aline\r\nConnection: close\r\n\r\n"
        sock.sendall(head.encode())
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    headers = reply.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
    assert "x-request-id: evil" not in headers and re.search(
        r"x-request-id: [0-9a-f]{32}\r\n", headers + "\r\n"
    )


def test_an_unhandled_error_is_a_json_500_with_the_request_id(tmp_path: Path) -> None:
    cfg = Settings(store=f"disk:{tmp_path / 'store'}", _env_file=None)
    app: FastAPI = create_app(cfg, runner=tiny_runner(), store=DiskStore(tmp_path / "store"))

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/boom", headers={"X-Request-ID": "bug-1"})
        assert r.status_code == 500 and r.headers["x-request-id"] == "bug-1"
        assert r.json() == {"error": {"type": "internal", "message": "internal server error"}}
        assert GENERATED.fullmatch(client.get("/boom").headers["x-request-id"])


def log_lines(server: ServerProcess, request_id: str) -> list[str]:
    return [line for line in server.log().splitlines() if f"[{request_id}]:" in line]


def test_task_writes_and_engine_lines_are_logged_with_the_request_id(tmp_path: Path) -> None:
    model = save_tiny_model(tmp_path / "model")
    server = ServerProcess(
        model, f"disk:{tmp_path / 'store'}", tmp_path / "server.log", SOFTSERVE_LOG_LEVEL="DEBUG"
    )
    try:
        server.wait_ready()
        base = tiny_runner().fingerprint
        with httpx.Client(base_url=server.url, timeout=60) as client:
            r = client.put(
                "/tasks/sentiment", files=upload_files("sentiment", base), headers={"X-Request-ID": "up-1"}
            )
            assert r.status_code == 201, r.text
            sha = r.json()["sha256"]
            gists = torch.randn(2, base.hidden_size, generator=torch.Generator().manual_seed(0))  # [k, d]
            emb = make_artifact(
                "gists", "gist_embedding", {"num_gist_tokens": 2}, {"gist_embeddings": gists}, base
            )
            files = {"file": ("g.safetensors", to_bytes(emb), "application/octet-stream")}
            assert client.put("/tasks/gists", files=files).status_code == 201
            secret = "classify-this-secret-instruction"
            body = {"gist_task": "gists", "instruction": secret}
            r = client.post("/tasks/short/compress", json=body, headers={"X-Request-ID": "cmp-1"})
            assert r.status_code == 201, r.text
            compressed_sha = r.json()["sha256"]
            gen = {"task_id": "sentiment", "prompt": "hello", "max_new_tokens": 3}
            assert client.post("/generate", json=gen, headers={"X-Request-ID": "gen-1"}).status_code == 200
            assert (
                client.put("/tasks/sentiment", files=upload_files("sentiment", base, seed=1)).status_code
                == 201
            )
            r = client.post(
                "/tasks/sentiment/rollback", json={"version": 1}, headers={"X-Request-ID": "rb-1"}
            )
            assert r.status_code == 201, r.text
            assert client.delete("/tasks/sentiment", headers={"X-Request-ID": "del-1"}).status_code == 204
    finally:
        server.stop()

    nbytes = 4 * base.hidden_size * 4  # prompt [4, d] float32
    upload = [line for line in log_lines(server, "up-1") if "upload:" in line]
    assert upload, server.log()[-3000:]
    assert (
        f"upload: task=sentiment version=1 method=prompt_tuning bytes={nbytes} sha256={sha[:12]}" in upload[0]
    )
    assert sha not in server.log()  # a prefix, not the whole hash
    compress = [line for line in log_lines(server, "cmp-1") if "compress:" in line]
    assert (
        compress and "task=short version=1 method=gist" in compress[0] and compressed_sha[:12] in compress[0]
    )
    assert secret not in server.log()  # the instruction is never logged
    rollback = [line for line in log_lines(server, "rb-1") if "rollback to 1:" in line]
    assert (
        rollback
        and f"task=sentiment version=3 method=prompt_tuning bytes={nbytes} sha256={sha[:12]}" in rollback[0]
    )
    delete = [line for line in log_lines(server, "del-1") if "delete:" in line]
    assert delete and f"task=sentiment version=3 method=prompt_tuning sha256={sha[:12]}" in delete[0]
    # the request's lines: the engine thread's (by the engine's numeric id) and uvicorn's access line
    generate = log_lines(server, "gen-1")
    assert any(
        "softserve.engine" in line and re.search(r"request \d+ finished", line) for line in generate
    ), generate
    assert any('"POST /generate HTTP/1.1" 200' in line for line in generate), generate
    assert any('"PUT /tasks/sentiment HTTP/1.1" 201' in line for line in log_lines(server, "up-1"))
