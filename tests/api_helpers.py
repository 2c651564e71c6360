"""Helpers for API tests: a tiny model + byte tokenizer behind the real app, and artifact builders."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi.testclient import TestClient

from prompt_store import Fingerprint, make_artifact, to_bytes
from prompt_store.backends import DiskStore, Store
from runtime.model_runner import ModelRunner
from server.app import create_app
from server.settings import Settings

VOCAB = 259  # tiny_tokenizer: 256 byte tokens + <pad>, <s>, </s>


def tiny_runner() -> ModelRunner:
    from conftest import tiny_llama
    from tiny_tokenizer import tiny_tokenizer

    return ModelRunner.from_model(tiny_llama(seed=0, vocab_size=VOCAB), tiny_tokenizer(), "tiny-llama")


def prompt_artifact_bytes(task_id: str, base: Fingerprint, m: int = 4, seed: int = 0) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randn(m, base.hidden_size, generator=gen)  # [m, d]
    artifact = make_artifact(task_id, "prompt_tuning", {"num_virtual_tokens": m}, {"prompt": prompt}, base)
    return to_bytes(artifact)


def upload(client: TestClient, task_id: str, data: bytes, headers: dict[str, str] | None = None) -> Any:
    files = {"file": (f"{task_id}.safetensors", io.BytesIO(data), "application/octet-stream")}
    return client.put(f"/tasks/{task_id}", files=files, headers=headers or {})


@contextmanager
def serving(tmp_path: Path, store: Store | None = None, **settings: Any) -> Iterator[tuple[TestClient, Any]]:
    """Yield (client, state) of a running app on a tiny model with a disk store under tmp_path."""
    runner = tiny_runner()
    store = store or DiskStore(tmp_path / "store")
    cfg = Settings(store=f"disk:{tmp_path / 'store'}", store_poll_interval=0.2, **settings)
    app = create_app(cfg, runner=runner, store=store)
    with TestClient(app) as client:
        yield client, app.state.softserve
