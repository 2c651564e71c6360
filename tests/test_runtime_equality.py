"""One runtime: training's evaluation decodes exactly what the server's /generate returns, for every method;
and the runtime's dtype/device/offline policy for loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from api_helpers import serving, tiny_runner, upload
from conftest import tiny_llama
from tiny_tokenizer import tiny_tokenizer

from prompt_store import Artifact, to_bytes, to_serving_form
from runtime.generate import greedy, prefill_items
from runtime.model_runner import ModelRunner, hub_offline, load_model, resolve_dtype
from server.settings import Settings
from training import model as training_model
from training.data import Formatter
from training.eval import predict_ids
from training.methods import build, compress

METHODS = {
    "prompt_tuning": {"num_virtual_tokens": 4},
    "p_tuning": {"num_virtual_tokens": 4, "encoder_hidden_size": 16},
    "prefix_tuning": {"num_virtual_tokens": 4, "projection_hidden_size": 32},
    "accept": {"num_virtual_tokens": 4, "num_subspaces": 4, "num_codewords": 8, "added_length": 3},
    "gist": {"num_gist_tokens": 3},
}
INPUTS = ["n1", "hello world", "a", "the quick brown fox jumps", "7 + 35 = ?"]
INSTRUCTION = "Answer yes for odd numbers."
NEW = 8


def trained_artifact(runner: ModelRunner, method: str, seed: int) -> Artifact:
    """A method's export moved off its initialisation (so the prompt visibly matters)."""
    trainer = build(method, runner.model, runner.tokenizer, **METHODS[method])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainer.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    return trainer.export(f"task-{seed}", runner.fingerprint)


def without_stop(ids: list[int], stops: frozenset[int]) -> list[int]:
    """Training keeps the stop id that ends a row; /generate ends the row there without returning it."""
    return ids[:-1] if ids and ids[-1] in stops else ids


def test_training_predictions_equal_generate_for_every_method(tmp_path: Path) -> None:
    runner = tiny_runner()  # training's own runner: same weights as the app's, another object
    fmt = Formatter(runner.tokenizer)  # evaluation's formatting: the chat template of the tiny tokenizer
    ids = [fmt.prompt_ids(text) for text in INPUTS]
    outputs: dict[str, list[list[int]]] = {}
    with serving(tmp_path) as (client, _):
        for seed, method in enumerate(sorted(METHODS)):
            artifact = trained_artifact(runner, method, seed)
            task = f"task-{seed}"
            assert upload(client, task, to_bytes(artifact)).status_code == 201
            if method == "gist":  # evaluation compresses the instruction; so does POST /tasks/{id}/compress
                served_task = f"{task}-compressed"
                body = {"gist_task": task, "instruction": INSTRUCTION}
                assert client.post(f"/tasks/{served_task}/compress", json=body).status_code == 201
                artifact = compress(runner, runner.tokenizer, artifact, INSTRUCTION, task_id=served_task)
                task = served_task
            trained = predict_ids(runner, runner.tokenizer, ids, to_serving_form(artifact), NEW, batch_size=8)
            for text, row in zip(INPUTS, trained, strict=True):
                messages = [{"role": "user", "content": text}]
                r = client.post(
                    "/generate", json={"task_id": task, "messages": messages, "max_new_tokens": NEW}
                )
                assert r.status_code == 200, r.text
                assert r.json()["tokens"] == without_stop(row, runner.eos_ids), (method, text)
            outputs[method] = trained
    assert all(len(row) >= 2 for rows in outputs.values() for row in rows)  # real continuations, not stops
    assert len({str(rows) for rows in outputs.values()}) == len(METHODS)  # each prompt changes the answers


def test_greedy_ends_each_row_at_its_first_stop_id_and_leaves_the_others_unchanged() -> None:
    runner = tiny_runner()
    rows = [[40, 41, 42], [50], [60, 61, 62, 63, 64]]
    full = greedy(runner, prefill_items(runner, None, rows), 6, set())
    assert [len(r) for r in full] == [6, 6, 6]
    stop = full[0][2]
    got = greedy(runner, prefill_items(runner, None, rows), 6, {stop})
    want = [r[: r.index(stop) + 1] if stop in r else r for r in full]
    assert got == want and len(got[0]) == 3


def test_dtype_policy_auto_is_float32_on_cpu_and_bfloat16_on_cuda() -> None:
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("auto", "cuda:1") == torch.bfloat16
    assert resolve_dtype("float16", "cuda") == torch.float16  # an explicit dtype overrides the policy
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert Settings().dtype == "auto"
    with pytest.raises(ValueError, match="auto or one of"):
        resolve_dtype("float64", "cpu")


def test_load_model_auto_dtype_on_cpu_and_training_loads_through_runtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny_llama(seed=1, vocab_size=259).save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    runner = load_model(str(tmp_path / "m"), device="cpu")  # dtype defaults to auto
    assert runner.dtype == torch.float32 and runner.device == torch.device("cpu")
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in runner.model.parameters())
    assert runner.eos_ids == frozenset({2})

    lm = training_model.load_model(str(tmp_path / "m"), dtype="auto", device="cpu")
    assert isinstance(lm.runner, ModelRunner) and lm.model is lm.runner.model
    assert lm.fingerprint() == runner.fingerprint and lm.name == str(tmp_path / "m")
    half = training_model.load_model(str(tmp_path / "m"), dtype="bfloat16", device="cpu")
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}

    for value, offline in (("1", True), ("ON", True), ("true", True), ("0", False), ("", False)):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert hub_offline() is offline
