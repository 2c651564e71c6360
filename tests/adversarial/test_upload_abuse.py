"""Uploads that must be refused whole, over real HTTP (uvicorn), each leaving nothing stored:

- an artifact this model could never serve (no room for one prompt and one new token after where the input
  starts, an empty embedding hash): 422
  at upload, naming the field and the limit;
- an ambiguous upload (artifact + adapter, two adapter configs or weights, two artifacts): 400 naming files;
- the reserved name `base` (what requests call the bare model), on every route that creates a task.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from api_helpers import prompt_artifact_bytes
from live_server import threaded_server
from upload_helpers import peft_adapter, put_files, zip_of

from prompt_store import Fingerprint, InvalidTaskId, make_artifact, to_bytes
from server.service import BASE_TASK
from training.cli import push_to_server, push_to_store


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, Fingerprint, int, str]]:
    folder = tmp_path_factory.mktemp("upload-abuse")
    with threaded_server(folder) as (url, state), httpx.Client(base_url=url, timeout=30) as client:
        yield client, state.runner.fingerprint, state.runner.max_context, url


def assert_nothing_stored(client: httpx.Client, task_id: str) -> None:
    assert client.get(f"/tasks/{task_id}").status_code == 404


# ---- never servable on this model: refused at upload ------------------------------------------------------


def unservable(base: Fingerprint, context: int, case: str) -> tuple[bytes, str]:
    """(artifact bytes, the field the refusal must name)."""
    gen = torch.Generator().manual_seed(0)
    L, H, Dh, d = base.num_layers, base.num_kv_heads, base.head_dim, base.hidden_size
    if case == "prompt_tuning":
        m = context - 1  # the input starts at position context - 1: one prompt token, no new one
        art = make_artifact(
            "u", case, {"num_virtual_tokens": m}, {"prompt": torch.randn(m, d, generator=gen)}, base
        )
        return to_bytes(art), "num_virtual_tokens"
    if case == "prefix_tuning":
        kv = {n: torch.randn(L, H, context, Dh, generator=gen) for n in ("keys", "values")}  # [L, Hkv, m, Dh]
        return to_bytes(
            make_artifact("u", case, {"num_virtual_tokens": context}, kv, base)
        ), "num_virtual_tokens"
    if case == "gist":
        kv = {n: torch.randn(L, H, 2, Dh, generator=gen) for n in ("keys", "values")}  # [L, Hkv, k, Dh]
        cfg = {"num_gist_tokens": 2, "next_position": context - 1}
        return to_bytes(make_artifact("u", "gist", cfg, kv, base)), "next_position"
    assert case == "empty-embedding-hash"
    hashless = dataclasses.replace(base, embedding_hash="")
    art = make_artifact(
        "u", "prompt_tuning", {"num_virtual_tokens": 4}, {"prompt": torch.randn(4, d)}, hashless
    )
    return to_bytes(art), "base_model.embedding_hash"


@pytest.mark.parametrize("case", ["prompt_tuning", "prefix_tuning", "gist", "empty-embedding-hash"])
def test_an_artifact_that_could_never_be_served_is_refused_at_upload(server, case: str) -> None:  # type: ignore[no-untyped-def]
    client, base, context, _ = server
    data, field = unservable(base, context, case)
    r = put_files(client, "u", [("u.safetensors", data)])
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == field
    if field != "base_model.embedding_hash":
        assert str(context) in error["message"]  # names the limit
    assert_nothing_stored(client, "u")


def test_a_peft_adapter_longer_than_the_context_is_refused(server) -> None:  # type: ignore[no-untyped-def]
    client, base, context, _ = server
    adapter = peft_adapter(base, m=context)
    r = put_files(client, "u", list(adapter.items()))
    assert r.status_code == 422 and r.json()["error"]["field"] == "num_virtual_tokens", r.text
    assert_nothing_stored(client, "u")


def test_the_last_servable_length_is_accepted(server) -> None:  # type: ignore[no-untyped-def]
    client, base, context, _ = server
    data = prompt_artifact_bytes("fits", base, m=context - 2)
    assert put_files(client, "fits", [("fits.safetensors", data)]).status_code == 201
    r = client.post("/generate", json={"task_id": "fits", "prompt": "a", "max_new_tokens": 1})
    assert r.status_code == 200, r.text
    assert client.delete("/tasks/fits").status_code == 204


# ---- ambiguous uploads: 400 naming the files, never a silent pick ------------------------------------------


def ambiguous(base: Fingerprint, case: str) -> tuple[list[tuple[str, bytes]], list[str]]:
    """(the uploaded files, the names the refusal must mention)."""
    art = prompt_artifact_bytes("amb", base)
    peft = peft_adapter(base)
    cfg, weights = peft["adapter_config.json"], peft["adapter_model.safetensors"]
    zips: dict[str, tuple[dict[str, bytes], list[str]]] = {
        "zip-artifact-and-adapter": ({"model.safetensors": art, **peft}, ["model.safetensors", *peft]),
        "zip-two-configs": (
            {
                "a/adapter_config.json": cfg,
                "b/adapter_config.json": cfg,
                "a/adapter_model.safetensors": weights,
            },
            ["a/adapter_config.json", "b/adapter_config.json"],
        ),
        "zip-two-weights": (
            {
                "adapter_config.json": cfg,
                "x/adapter_model.safetensors": weights,
                "y/adapter_model.safetensors": weights,
            },
            ["x/adapter_model.safetensors", "y/adapter_model.safetensors"],
        ),
        "zip-two-artifacts": (
            {"one.safetensors": art, "two.safetensors": art},
            ["one.safetensors", "two.safetensors"],
        ),
    }
    if case in zips:
        members, names = zips[case]
        return [("upload.zip", zip_of(members))], names
    files: dict[str, tuple[list[tuple[str, bytes]], list[str]]] = {
        "files-artifact-and-adapter": (
            [("model.safetensors", art), *peft.items()],
            ["model.safetensors", *peft],
        ),
        "files-two-artifacts": (
            [("one.safetensors", art), ("two.safetensors", art)],
            ["one.safetensors", "two.safetensors"],
        ),
        "files-same-name-twice": (
            [("same.safetensors", art), ("same.safetensors", art)],
            ["same.safetensors"],
        ),
        "files-zip-and-more": ([("adapter.zip", zip_of(peft)), ("notes.safetensors", art)], ["adapter.zip"]),
    }
    return files[case]


AMBIGUOUS = [
    "zip-artifact-and-adapter",
    "zip-two-configs",
    "zip-two-weights",
    "zip-two-artifacts",
    "files-artifact-and-adapter",
    "files-two-artifacts",
    "files-same-name-twice",
    "files-zip-and-more",
]


@pytest.mark.parametrize("case", AMBIGUOUS)
def test_ambiguous_uploads_are_400_naming_the_files(server, case: str) -> None:  # type: ignore[no-untyped-def]
    client, base, _, _ = server
    files, names = ambiguous(base, case)
    r = put_files(client, "amb", files)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    for name in names:
        assert name in message, (name, message)
    assert_nothing_stored(client, "amb")


def test_one_adapter_in_a_folder_with_a_readme_is_accepted(server) -> None:  # type: ignore[no-untyped-def]
    client, base, _, _ = server
    members = {f"out/{name}": data for name, data in peft_adapter(base).items()} | {"out/README.md": b"# hi"}
    r = put_files(client, "folder", [("adapter.zip", zip_of(members))])
    assert r.status_code == 201, r.text
    assert client.delete("/tasks/folder").status_code == 204


# ---- the reserved name ------------------------------------------------------------------------------------


def test_base_is_reserved_on_every_route(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client, fp, _, url = server
    r = put_files(client, "base", [("base.safetensors", prompt_artifact_bytes("base", fp))])
    assert r.status_code == 422 and r.json()["error"]["field"] == "task_id" and "reserved" in r.text
    r = put_files(client, "base", list(peft_adapter(fp).items()))
    assert r.status_code == 422 and "reserved" in r.text
    r = client.post("/tasks/base/compress", json={"gist_task": "g", "instruction": "be brief"})
    assert r.status_code == 422 and "reserved" in r.text
    artifact = make_artifact(
        "base", "prompt_tuning", {"num_virtual_tokens": 2}, {"prompt": torch.zeros(2, 64)}, fp
    )
    with pytest.raises(RuntimeError, match="422"):
        push_to_server(artifact, url, None)
    with pytest.raises(InvalidTaskId, match="reserved"):
        push_to_store(artifact, str(tmp_path / "direct"))
    assert client.get("/tasks/base").status_code == 404
    r = client.post("/generate", json={"task_id": "base", "prompt": "hi", "max_new_tokens": 2})
    assert r.status_code == 200 and r.json()["task_id"] == "base"  # still the bare model
    from prompt_store.task_id import RESERVED_TASK_IDS

    assert BASE_TASK in RESERVED_TASK_IDS  # the one name, shared by the store and the request routes
