"""HTTP API on a tiny model: generation matches a plain reference, uploads, errors, auth, hot swap."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from api_helpers import prompt_artifact_bytes, serving, upload

from prompt_store import from_bytes


def reference_tokens(state, prompt_bytes: bytes, text: str, new: int) -> list[int]:  # type: ignore[no-untyped-def]
    """HF generate with the soft prompt concatenated to the input embeddings (no engine code)."""
    model, tok = state.runner.model, state.runner.tokenizer
    soft = from_bytes(prompt_bytes).tensors["prompt"]  # [m, d]
    ids = torch.tensor(tok(text)["input_ids"])  # [T]
    x = torch.cat([soft, model.get_input_embeddings()(ids)], 0)[None]  # [1, m+T, d]
    with torch.no_grad():
        out = model.generate(
            inputs_embeds=x,
            attention_mask=torch.ones(1, x.shape[1], dtype=torch.long),
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=2,
        )
    return [t for t in out[0].tolist()]


def test_upload_generate_matches_reference(tmp_path: Path) -> None:
    with serving(tmp_path) as (client, state):
        data = prompt_artifact_bytes("sentiment", state.runner.fingerprint, m=5)
        r = upload(client, "sentiment", data)
        assert r.status_code == 201, r.text
        assert r.json()["version"] == 1 and r.json()["method"] == "prompt_tuning"
        r = client.post(
            "/generate", json={"task_id": "sentiment", "prompt": "great movie!", "max_new_tokens": 12}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["task_version"] == 1 and body["usage"]["virtual_tokens"] == 5
        assert body["tokens"] == reference_tokens(state, data, "great movie!", 12)
        assert (
            body["text"] == state.runner.tokenizer.decode(body["tokens"], skip_special_tokens=True)
            or body["text"]
        )
        listed = client.get("/tasks").json()["tasks"]
        assert [t["task_id"] for t in listed] == ["sentiment"]
        assert client.get("/tasks/sentiment").json()["version"] == 1


def test_bare_model_and_openai_routes(tmp_path: Path) -> None:
    with serving(tmp_path) as (client, _):
        bare = client.post("/generate", json={"prompt": "hello", "max_new_tokens": 5}).json()
        assert bare["task_id"] == "base" and 1 <= len(bare["tokens"]) <= 5
        cmpl = client.post(
            "/v1/completions", json={"model": "base", "prompt": "hello", "max_tokens": 5}
        ).json()
        assert cmpl["choices"][0]["text"] == bare["text"]
        assert cmpl["usage"]["completion_tokens"] == len(bare["tokens"])
        chat = client.post(
            "/v1/chat/completions", json={"model": "base", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"


def test_streaming_sse_equals_non_streaming(tmp_path: Path) -> None:
    with serving(tmp_path) as (client, state):
        upload(client, "t1", prompt_artifact_bytes("t1", state.runner.fingerprint))
        req = {"task_id": "t1", "prompt": "abc", "max_new_tokens": 8}
        full = client.post("/generate", json=req).json()
        chunks = []
        with client.stream("POST", "/generate", json={**req, "stream": True}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:]))
        assert [c["token"] for c in chunks if c["token"] is not None] == full["tokens"]
        assert "".join(c["text"] for c in chunks) == full["text"]
        assert chunks[-1]["finish_reason"] == full["finish_reason"] and chunks[-1]["task_version"] == 1


def test_errors_name_field_and_limit(tmp_path: Path) -> None:
    with serving(tmp_path, max_new_tokens=32, max_prompt_tokens=20, max_body_bytes=64 * 1024) as (
        client,
        state,
    ):
        upload(client, "t1", prompt_artifact_bytes("t1", state.runner.fingerprint, m=8))
        assert client.post("/generate", json={"task_id": "nope", "prompt": "x"}).status_code == 404
        r = client.post("/generate", json={"prompt": "x", "max_new_tokens": 0})
        assert r.status_code == 422 and "max_new_tokens" in r.text and "1" in r.text
        r = client.post("/generate", json={"prompt": "x", "max_new_tokens": 33})
        assert r.status_code == 422 and "max_new_tokens" in r.text and "32" in r.text
        r = client.post("/generate", json={"prompt": "x", "temperature": -1})
        assert r.status_code == 422 and "temperature" in r.text
        r = client.post("/generate", json={"prompt": "x", "bogus": 1})
        assert r.status_code == 422 and "bogus" in r.text
        # 15 prompt tokens fit alone (limit 20) but not with the task's 8 virtual tokens
        assert client.post("/generate", json={"prompt": "a" * 15, "max_new_tokens": 2}).status_code == 200
        r = client.post("/generate", json={"task_id": "t1", "prompt": "a" * 15, "max_new_tokens": 2})
        assert r.status_code == 422 and "8 virtual" in r.text and "20" in r.text
        r = client.post(
            "/generate",
            content=b"{" + b" " * (70 * 1024) + b"}",
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 413
        assert client.put("/tasks/BAD..id", files={"file": ("a", b"x")}).status_code == 422
        metrics = client.get("/metrics").text
        assert 'softserve_rejections_total{reason="not_found"}' in metrics
        assert 'softserve_rejections_total{reason="limit"}' in metrics


def test_failed_upload_keeps_previous_version(tmp_path: Path) -> None:
    with serving(tmp_path) as (client, state):
        good = prompt_artifact_bytes("t1", state.runner.fingerprint, m=4)
        assert upload(client, "t1", good).status_code == 201
        before = client.post("/generate", json={"task_id": "t1", "prompt": "hi", "max_new_tokens": 6}).json()
        tampered = bytearray(good)
        tampered[-3] ^= 0xFF
        r = upload(client, "t1", bytes(tampered))
        assert r.status_code == 422 and "sha256" in r.text
        wrong = prompt_artifact_bytes("t1", state.runner.fingerprint, m=4)
        r = upload(client, "t1", b"\x80\x04not a safetensors file" + wrong[:10])
        assert r.status_code == 422
        after = client.post("/generate", json={"task_id": "t1", "prompt": "hi", "max_new_tokens": 6}).json()
        assert after["task_version"] == 1 and after["tokens"] == before["tokens"]


def test_hot_swap_next_request_uses_new_version(tmp_path: Path) -> None:
    with serving(tmp_path) as (client, state):
        fp = state.runner.fingerprint
        upload(client, "t1", prompt_artifact_bytes("t1", fp, seed=1))
        with client.stream(
            "POST", "/generate", json={"task_id": "t1", "prompt": "q", "max_new_tokens": 30, "stream": True}
        ) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["token"] is not None
            assert upload(client, "t1", prompt_artifact_bytes("t1", fp, seed=2)).json()["version"] == 2
            rest = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert rest[-1]["task_version"] == 1 and rest[-1]["finish_reason"] in ("length", "stop")
        after = client.post("/generate", json={"task_id": "t1", "prompt": "q", "max_new_tokens": 3}).json()
        assert after["task_version"] == 2
        assert client.delete("/tasks/t1").status_code == 204
        assert client.post("/generate", json={"task_id": "t1", "prompt": "q"}).status_code == 404


GEN_KEY, ADMIN_KEY = "gen-key-0123456789", "admin-key-0123456789"


def test_every_protected_route_needs_a_key(tmp_path: Path) -> None:
    with serving(tmp_path, api_key=GEN_KEY, admin_key=ADMIN_KEY) as (client, state):
        public = {"/healthz", "/readyz"}
        checked = 0
        spec = client.get("/openapi.json", headers={"Authorization": f"Bearer {GEN_KEY}"}).json()
        for route_path, operations in spec["paths"].items():
            if route_path in public:
                continue
            path = route_path.replace("{task_id}", "t1")
            for method in operations:
                for headers in ({}, {"Authorization": "Bearer wrong"}):
                    assert client.request(method, path, headers=headers).status_code == 401, (method, path)
                assert client.request(method, path + f"?api_key={GEN_KEY}").status_code == 401
                checked += 1
        assert checked >= 8
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        gen = {"Authorization": f"Bearer {GEN_KEY}"}
        data = prompt_artifact_bytes("t1", state.runner.fingerprint)
        assert (
            upload(client, "t1", data, headers=gen).status_code == 401
        )  # generation key never grants writes
        assert upload(client, "t1", data, headers=admin).status_code == 201
        assert (
            client.post("/generate", json={"prompt": "x", "max_new_tokens": 2}, headers=gen).status_code
            == 200
        )
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
