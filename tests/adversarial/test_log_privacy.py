"""Logs carry no request text by default, and no store credentials (every logger, DEBUG level)."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest
from api_helpers import prompt_artifact_bytes, serving, tiny_runner, upload
from fastapi.testclient import TestClient

from prompt_store.backends import RedisStore
from server.app import create_app
from server.settings import Settings


def test_request_text_never_reaches_the_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    marker = f"zq{uuid.uuid4().hex[:12]}"  # appears nowhere unless a prompt is logged
    caplog.set_level(logging.DEBUG)
    with serving(tmp_path, max_prompt_tokens=200, max_new_tokens=16) as (client, state):
        assert upload(client, "t", prompt_artifact_bytes("t", state.runner.fingerprint)).status_code == 201
        outputs: list[str] = []
        r = client.post("/generate", json={"task_id": "t", "prompt": f"say {marker}", "max_new_tokens": 8})
        assert r.status_code == 200
        outputs.append(r.json()["text"])
        with client.stream(
            "POST", "/generate", json={"prompt": f"stream {marker}", "max_new_tokens": 8, "stream": True}
        ) as s:
            assert s.status_code == 200 and marker not in s.read().decode()
        chat = {"model": "t", "messages": [{"role": "user", "content": f"chat {marker}"}], "max_tokens": 8}
        r = client.post("/v1/chat/completions", json=chat)
        assert r.status_code == 200
        outputs.append(r.json()["choices"][0]["message"]["content"])
        r = client.post("/v1/completions", json={"model": "base", "prompt": marker, "max_tokens": 8})
        assert r.status_code == 200
        # rejected requests: over the token limit, a stop list over its limits, an unknown task
        assert client.post("/generate", json={"prompt": marker * 40}).status_code == 422
        assert client.post("/generate", json={"prompt": marker, "stop": [marker] * 50}).status_code == 422
        assert client.post("/generate", json={"task_id": "nope", "prompt": marker}).status_code == 404
    assert caplog.records, "nothing was captured: the check would be vacuous"
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert marker not in logged
    for text in outputs:
        if len(text.strip()) >= 8:  # long enough not to occur by chance
            assert text not in logged


def test_store_credentials_are_not_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secret = f"pw{uuid.uuid4().hex[:12]}"
    url = f"redis://:{secret}@127.0.0.1:1/0"  # nothing listens: the app starts unready
    caplog.set_level(logging.DEBUG)
    app = create_app(Settings(store=url), runner=tiny_runner(), store=RedisStore(url))
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503
    assert "ready: model=" in caplog.text  # the start-up line that names the store was logged
    assert secret not in caplog.text
