"""PEFT adapters uploaded over HTTP (zip and two files) serve exactly like PEFT's own computation."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import torch
from api_helpers import VOCAB, serving
from conftest import tiny_llama
from engine_refs import ref_generate_with_cache, ref_peft_forward
from peft import PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

NEW = 8
PROMPT = "the adapter says"


def saved_adapter(config: Any, folder: Path) -> Any:
    torch.manual_seed(3)
    peft_model = get_peft_model(tiny_llama(seed=0, vocab_size=VOCAB), config).eval()
    peft_model.save_pretrained(folder)
    return peft_model


def zipped(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            archive.write(folder / name, f"adapter/{name}")
    return buf.getvalue()


def generated(client: Any, task_id: str) -> dict[str, Any]:
    r = client.post("/generate", json={"task_id": task_id, "prompt": PROMPT, "max_new_tokens": NEW})
    assert r.status_code == 200, r.text
    return dict(r.json())


def agrees(served: dict[str, Any], reference: list[int]) -> bool:
    """Served tokens equal the reference; the server stops at eos, so the reference may run on."""
    n = len(served["tokens"])
    return served["tokens"] == reference[:n] and (n == NEW or served["finish_reason"] == "stop")


def test_prompt_tuning_zip_upload_matches_peft(tmp_path: Path) -> None:
    peft_model = saved_adapter(
        PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=6), tmp_path / "a"
    )
    with serving(tmp_path) as (client, state):
        r = client.put(
            "/tasks/pt", files={"file": ("adapter.zip", zipped(tmp_path / "a"), "application/zip")}
        )
        assert r.status_code == 201, r.text
        assert r.json()["method"] == "prompt_tuning"
        served = generated(client, "pt")
        assert served["usage"]["virtual_tokens"] == 6
        ids = state.runner.tokenizer(PROMPT)["input_ids"]
        assert agrees(served, ref_peft_forward(peft_model, ids, NEW))


def test_prefix_tuning_two_file_upload_matches_peft_prefix(tmp_path: Path) -> None:
    peft_model = saved_adapter(
        PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5), tmp_path / "a"
    )
    files = [
        ("file", (name, (tmp_path / "a" / name).read_bytes(), "application/octet-stream"))
        for name in ("adapter_config.json", "adapter_model.safetensors")
    ]
    with serving(tmp_path) as (client, state):
        r = client.put("/tasks/prefix", files=files)
        assert r.status_code == 201, r.text
        assert r.json()["method"] == "prefix_tuning"
        served = generated(client, "prefix")
        ids = state.runner.tokenizer(PROMPT)["input_ids"]
        with torch.no_grad():
            cache = peft_model.get_prompt(batch_size=1)  # PEFT's own prefix keys/values
        reference = ref_generate_with_cache(peft_model.get_base_model(), cache, ids, NEW)
        assert agrees(served, reference)


def test_adapters_change_the_output(tmp_path: Path) -> None:
    """Guard against a vacuous match: the served adapters do not just reproduce the bare model."""
    saved_adapter(PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=6), tmp_path / "a")
    saved_adapter(PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5), tmp_path / "b")
    with serving(tmp_path) as (client, _):
        assert client.put("/tasks/pt", files={"file": ("a.zip", zipped(tmp_path / "a"))}).status_code == 201
        assert client.put("/tasks/px", files={"file": ("b.zip", zipped(tmp_path / "b"))}).status_code == 201
        bare = client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": NEW}).json()["tokens"]
        assert generated(client, "pt")["tokens"] != bare
        assert generated(client, "px")["tokens"] != bare
