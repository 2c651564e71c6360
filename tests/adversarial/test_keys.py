"""Key rules, against real uvicorn: weak keys refuse to start, OpenAI clients' bearer is fine when no
API key is set, and the API docs follow SOFTSERVE_API_KEY (unless SOFTSERVE_PUBLIC_DOCS)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from api_helpers import prompt_artifact_bytes
from conftest import free_port
from dotenv import dotenv_values
from live_server import save_tiny_model, threaded_server
from pydantic import ValidationError

from server.settings import MIN_KEY_CHARS, Settings, key_problem

ROOT = Path(__file__).resolve().parents[2]
ADMIN, GEN = "admin-key-for-tests-0001", "gen-key-for-tests-0001"
WEAK = {"empty": "", "spaces": "   ", "tab": "\t", "15-chars": "k" * 15, "inner-space": "sixteen chars ok!"}
DOC_PATHS = ("/docs", "/redoc", "/openapi.json")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("field", ["admin_key", "api_key"])
@pytest.mark.parametrize("key", list(WEAK.values()), ids=list(WEAK))
def test_weak_keys_refuse_to_start(field: str, key: str) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(**{field: key}, _env_file=None)
    message = str(info.value)
    assert f"SOFTSERVE_{field.upper()}" in message
    assert key.strip() == "" or "16" in message or "spaces" in message
    assert key not in message or key.strip() == ""  # the key itself is never echoed


def test_strong_keys_start_and_must_differ() -> None:
    settings = Settings(admin_key="a" * MIN_KEY_CHARS, api_key="g" * MIN_KEY_CHARS, _env_file=None)
    assert settings.admin_key is not None and settings.api_key is not None
    with pytest.raises(ValidationError, match="SOFTSERVE_API_KEY equals SOFTSERVE_ADMIN_KEY"):
        Settings(admin_key=ADMIN, api_key=ADMIN, _env_file=None)


def test_env_example_ships_no_weak_key() -> None:
    values = dotenv_values(ROOT / ".env.example")
    for name in ("SOFTSERVE_ADMIN_KEY", "SOFTSERVE_API_KEY"):
        value = values.get(name)
        assert value is None or key_problem(name, value) is None, f".env.example sets {name}={value!r}"


@pytest.mark.parametrize("key", ["", "short-key"], ids=["empty", "short"])
def test_serve_exits_with_one_line_not_a_traceback(tmp_path: Path, key: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOFTSERVE_")}
    env.update(SOFTSERVE_ADMIN_KEY=key, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    model = save_tiny_model(tmp_path / "model")
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(free_port()), "--model", str(model)]
    cmd += ["--store", f"disk:{tmp_path / 'store'}"]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=60)  # today's main starts (anyone is admin) and never exits
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode != 0
    assert "Traceback" not in err + out
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "SOFTSERVE_ADMIN_KEY" in lines[0], err


@pytest.fixture(scope="module")
def admin_only(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    with threaded_server(tmp_path_factory.mktemp("admin-only"), admin_key=ADMIN) as (url, state):
        yield url, state


def test_any_bearer_reads_and_generates_when_no_api_key_is_set(admin_only) -> None:  # type: ignore[no-untyped-def]
    url, state = admin_only
    data = prompt_artifact_bytes("t1", state.runner.fingerprint)
    files = {"file": ("t1.safetensors", data, "application/octet-stream")}
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.put("/tasks/t1", files=files, headers=bearer("x")).status_code == 401
        assert client.put("/tasks/t1", files=files, headers=bearer(ADMIN)).status_code == 201
        for headers in (bearer("x"), {"X-API-Key": "x"}, {}):  # what OpenAI clients and curl send
            body = {"task_id": "t1", "prompt": "hi", "max_new_tokens": 2}
            assert client.post("/generate", json=body, headers=headers).status_code == 200
            openai_body = {"model": "t1", "prompt": "hi", "max_tokens": 2}
            assert client.post("/v1/completions", json=openai_body, headers=headers).status_code == 200
            assert client.get("/tasks", headers=headers).status_code == 200
            assert client.get("/tasks/t1", headers=headers).status_code == 200
            assert client.get("/metrics", headers=headers).status_code == 200
        assert client.delete("/tasks/t1", headers=bearer("x")).status_code == 401
        assert client.delete("/tasks/t1", headers=bearer(ADMIN)).status_code == 204


def test_docs_follow_the_api_key(tmp_path: Path) -> None:
    with threaded_server(tmp_path, api_key=GEN, admin_key=ADMIN) as (url, _):
        for path in DOC_PATHS:
            assert httpx.get(url + path).status_code == 401, path
            assert httpx.get(url + path, headers=bearer("x")).status_code == 401, path
            for key in (GEN, ADMIN):
                assert httpx.get(url + path, headers=bearer(key)).status_code == 200, path
        spec = httpx.get(url + "/openapi.json", headers=bearer(GEN)).json()
        assert "/generate" in spec["paths"]
        # the other routes keep their own rule
        assert httpx.post(url + "/generate", json={"prompt": "hi", "max_new_tokens": 1}).status_code == 401
        assert httpx.get(url + "/healthz").status_code == 200


@pytest.mark.parametrize("settings", [{"api_key": GEN, "public_docs": True}, {}], ids=["public", "no-key"])
def test_docs_open_when_public_or_without_an_api_key(tmp_path: Path, settings: dict[str, object]) -> None:
    with threaded_server(tmp_path, **settings) as (url, _):
        for path in DOC_PATHS:
            assert httpx.get(url + path).status_code == 200, path
        if settings:  # public docs open nothing else
            assert httpx.post(url + "/generate", json={"prompt": "h", "max_new_tokens": 1}).status_code == 401
