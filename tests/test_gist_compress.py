"""POST /tasks/{id}/compress: the server's gist compression equals the trainer's, and the result serves."""

from __future__ import annotations

from pathlib import Path

import torch
from api_helpers import serving, upload

from prompt_store import InputFormat, make_artifact, to_bytes
from training.methods.gist import compress as train_compress

INSTRUCTION = "Answer with the sentiment of the review: positive or negative."


def test_server_compress_equals_trainer_compress_and_serves(tmp_path: Path) -> None:
    with serving(tmp_path) as (client, state):
        base = state.runner.fingerprint
        gists = torch.randn(3, base.hidden_size, generator=torch.Generator().manual_seed(0))  # [k, d]
        emb = make_artifact(
            "my-gists", "gist_embedding", {"num_gist_tokens": 3}, {"gist_embeddings": gists}, base
        )
        assert upload(client, "my-gists", to_bytes(emb)).status_code == 201

        body = {"gist_task": "my-gists", "instruction": INSTRUCTION}
        r = client.post("/tasks/sentiment-gist/compress", json=body)
        assert r.status_code == 201, r.text
        assert r.json()["method"] == "gist" and r.json()["version"] == 1
        served = state.store.get("sentiment-gist")
        expected = train_compress(state.runner.model, state.runner.tokenizer, emb, INSTRUCTION)
        assert (
            served.manifest.method_config["next_position"] == expected.manifest.method_config["next_position"]
        )
        for name in ("keys", "values"):
            assert served.tensors[name].shape == expected.tensors[name].shape  # [L, Hkv, k, Dh]
            torch.testing.assert_close(served.tensors[name], expected.tensors[name], rtol=1e-5, atol=1e-6)

        out = client.post(
            "/generate", json={"task_id": "sentiment-gist", "prompt": "great!", "max_new_tokens": 4}
        )
        assert out.status_code == 200 and out.json()["usage"]["virtual_tokens"] == 3

        assert (
            client.post("/tasks/x/compress", json={**body, "gist_task": "sentiment-gist"}).status_code == 422
        )
        assert client.post("/tasks/x/compress", json={**body, "gist_task": "missing"}).status_code == 404
        assert client.post("/tasks/BAD/compress", json=body).status_code == 422


def test_a_compressed_gist_reads_its_input_in_the_format_its_gists_were_trained_with(tmp_path: Path) -> None:
    """Gists trained on chat-formatted input compress into a gist task that formats a plain prompt the same
    way: the served tokens for `prompt: X` equal those for `messages: [{user: X}]`."""
    chat = InputFormat(chat_template=True, system_prompt="Label the review.")
    with serving(tmp_path) as (client, state):
        base = state.runner.fingerprint
        gists = torch.randn(2, base.hidden_size, generator=torch.Generator().manual_seed(1))  # [k, d]
        emb = make_artifact(
            "chat-gists",
            "gist_embedding",
            {"num_gist_tokens": 2},
            {"gist_embeddings": gists},
            base,
            input_format=chat,
        )
        assert upload(client, "chat-gists", to_bytes(emb)).status_code == 201
        body = {"gist_task": "chat-gists", "instruction": INSTRUCTION}
        assert client.post("/tasks/chat-gist/compress", json=body).status_code == 201
        assert state.store.get("chat-gist").manifest.input_format == chat
        assert client.get("/tasks/chat-gist").json()["input_format"] == {
            "chat_template": True,
            "system_prompt": "Label the review.",
        }
        req = {"task_id": "chat-gist", "max_new_tokens": 4}
        as_prompt = client.post("/generate", json={**req, "prompt": "great!"}).json()
        as_chat = client.post(
            "/generate", json={**req, "messages": [{"role": "user", "content": "great!"}]}
        ).json()
        assert as_prompt["usage"]["prompt_tokens"] == as_chat["usage"]["prompt_tokens"] > 4
        assert as_prompt["tokens"] == as_chat["tokens"]
