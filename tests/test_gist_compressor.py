"""The learnable gist compressor (issue 14 item 3): its artifact, train = serve through
POST /tasks/{id}/compress, a frozen serving model, and the route's refusals. Tiny Llama (hidden 64, 2
layers)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from api_helpers import prompt_artifact_bytes, serving, tiny_runner, upload
from conftest import tiny_llama
from tiny_tokenizer import tiny_tokenizer

from prompt_store import ValidationError, from_bytes, to_bytes, validate_artifact
from runtime.gist import compress, gist_kv, instruction_ids
from runtime.model_runner import ModelRunner
from training.gist_eval import Condition, greedy
from training.gist_tasks import build_tasks, prompt_text, split_tasks
from training.methods.gist_compressor import CompressorConfig, GistCompressor, request_ids, train_compressor

INSTRUCTION = "Write the words backwards, last word first."


def trained(runner: ModelRunner, k: int = 2) -> GistCompressor:
    tasks, _ = split_tasks(build_tasks(per_task=40))
    cfg = CompressorConfig(num_gist_tokens=k, rank=4, steps=3, lr=5e-2, n_eval=8)
    comp, losses = train_compressor(runner, tasks[:3], cfg)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    return comp


@pytest.fixture(scope="module")
def compressor_bytes() -> bytes:
    runner = tiny_runner()  # the same weights as api_helpers.serving's model
    return to_bytes(trained(runner).to_artifact(runner, "my-compressor"))


def test_artifact_round_trip_and_fingerprint_refusal(compressor_bytes: bytes) -> None:
    runner = tiny_runner()
    artifact = from_bytes(compressor_bytes)
    assert artifact.manifest.method == "gist_compressor"
    assert artifact.manifest.base_model == runner.fingerprint
    validate_artifact(artifact, runner.fingerprint)
    assert set(artifact.tensors) == {"gist_embeddings"} | {
        f"lora_{ab}.{t}" for t in ("q_proj", "k_proj", "v_proj") for ab in "AB"
    }
    assert artifact.tensors["lora_A.k_proj"].shape == (2, 4, 64)  # [L, r, d]
    assert artifact.tensors["lora_B.k_proj"].shape == (2, 32, 4)  # [L, Hkv * Dh, r]
    assert float(artifact.tensors["lora_B.v_proj"].abs().max()) > 0  # trained (PEFT initialises B to 0)
    other = ModelRunner.from_model(tiny_llama(seed=1, vocab_size=259), tiny_tokenizer(), "tiny-llama")
    with pytest.raises(ValidationError, match="embedding_hash") as exc:
        validate_artifact(artifact, other.fingerprint)
    assert exc.value.field == "base_model"


def test_train_equals_serve(tmp_path: Path, compressor_bytes: bytes) -> None:
    with serving(tmp_path) as (client, state):
        runner = state.runner
        assert upload(client, "my-compressor", compressor_bytes).status_code == 201
        r = client.post(
            "/tasks/rev/compress", json={"compressor": "my-compressor", "instruction": INSTRUCTION}
        )
        assert r.status_code == 201, r.text
        served = state.store.get("rev")
        # training side: the trained module itself (not the stored bytes) computes the gist KV
        comp = trained(tiny_runner())
        keys, values = comp.gist_kv(runner, INSTRUCTION)  # [L, Hkv, k, Dh] each, with gradients
        n = len(instruction_ids(runner, INSTRUCTION))
        assert served.manifest.method_config["next_position"] == n + 2
        torch.testing.assert_close(served.tensors["keys"], keys.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(served.tensors["values"], values.detach(), rtol=1e-5, atol=1e-6)
        plain_keys, _ = gist_kv(runner, instruction_ids(runner, INSTRUCTION), comp.gist_embeddings.detach())
        assert not torch.allclose(plain_keys, keys.detach(), atol=1e-4)  # the adapter did run

        prompt = prompt_text("red fox jumps")
        out = client.post("/generate", json={"task_id": "rev", "prompt": prompt, "max_new_tokens": 6})
        assert out.status_code == 200, out.text
        cond = Condition(kv=(keys.detach(), values.detach()), start=n + 2)
        assert out.json()["tokens"] == greedy(runner, cond, request_ids(runner, prompt), 6)


def test_serving_model_unchanged_by_compress(tmp_path: Path, compressor_bytes: bytes) -> None:
    with serving(tmp_path) as (client, state):
        model = state.runner.model
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        modules = [(name, type(m)) for name, m in model.named_modules()]
        assert (
            upload(client, "other", prompt_artifact_bytes("other", state.runner.fingerprint)).status_code
            == 201
        )
        assert upload(client, "my-compressor", compressor_bytes).status_code == 201
        req = {"task_id": "other", "prompt": "unrelated request", "max_new_tokens": 6, "logprobs": 1}
        before = client.post("/generate", json=req).json()
        body = {"compressor": "my-compressor", "instruction": INSTRUCTION}
        assert client.post("/tasks/rev/compress", json=body).status_code == 201
        after = client.post("/generate", json=req).json()
        assert after["tokens"] == before["tokens"] and after["logprobs"] == before["logprobs"]
        assert [(name, type(m)) for name, m in model.named_modules()] == modules  # no LoRA layers injected
        assert model.state_dict().keys() == weights.keys()
        assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_compress_route_refusals(tmp_path: Path, compressor_bytes: bytes) -> None:
    with serving(tmp_path) as (client, state):
        base = state.runner.fingerprint
        assert upload(client, "prompt", prompt_artifact_bytes("prompt", base)).status_code == 201
        good = {"compressor": "my-compressor", "instruction": INSTRUCTION}

        def refused(body: dict[str, object], status: int) -> str:
            r = client.post("/tasks/x/compress", json=body)
            assert r.status_code == status, r.text
            assert r.json()["error"]["field"] == "compressor", r.text
            return str(r.json()["error"]["message"])

        assert "my-compressor" in refused(good, 404)  # unknown
        assert "prompt_tuning" in refused({**good, "compressor": "prompt"}, 422)  # not a compressor
        # a compressor for other base weights, in a store shared with another base (uploads check first)
        other = ModelRunner.from_model(tiny_llama(seed=1, vocab_size=259), tiny_tokenizer(), "tiny-llama")
        foreign = trained(other).to_artifact(other, "foreign")
        assert upload(client, "foreign", to_bytes(foreign)).status_code == 422
        state.store.put(foreign)
        assert "embedding_hash" in refused({**good, "compressor": "foreign"}, 422)
        refused({"instruction": INSTRUCTION}, 400)  # neither gist_task nor compressor
        refused({**good, "gist_task": "prompt"}, 400)  # both
        assert client.post("/tasks/x/compress", json={**good, "compressor": "a/../b"}).status_code == 422
        assert state.store.list() and "x" not in {i.task_id for i in state.store.list()}


def test_compress_with_a_compressor_artifact_matches_the_runtime_view(compressor_bytes: bytes) -> None:
    runner = tiny_runner()
    artifact = from_bytes(compressor_bytes)
    a = compress(runner, artifact, INSTRUCTION, "t")
    b = compress(runner, artifact, INSTRUCTION, "t")
    assert a.sha256 == b.sha256 and a.manifest.notes.startswith("compressed by my-compressor")
