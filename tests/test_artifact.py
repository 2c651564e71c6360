"""Artifact format: round trips, serving forms of every method, and refusal of bad or hostile input."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import random
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save as st_save

from prompt_store import (
    Artifact,
    ArtifactFormatError,
    Fingerprint,
    Limits,
    TooLarge,
    ValidationError,
    from_bytes,
    load,
    make_artifact,
    parse_and_validate,
    save,
    to_bytes,
    to_serving_form,
    validate_artifact,
)
from prompt_store.errors import StoreError

# hidden 64, 2 layers, 2 kv heads, head_dim 16 (the tiny Llama of conftest)
D, L, HKV, DH = 64, 2, 2, 16


KV3, KV2 = (L, HKV, 3, DH), (L, HKV, 2, DH)
ACCEPT: dict[str, Any] = {"num_virtual_tokens": 3, "num_subspaces": 4, "num_codewords": 5}
SCAP: dict[str, Any] = {"added_length": 2, "added_subspaces": 2, "added_codewords": 3}
ACCEPT_SHAPES: dict[str, tuple[int, ...]] = {"prompt_weight": (3, 4, 5), "prompt_codebook": (4, 5, D // 4)}
SCAP_SHAPES: dict[str, tuple[int, ...]] = {"added_weight": (2, 2, 3), "added_codebook": (2, 3, D // 2)}


def specs() -> dict[str, tuple[dict[str, Any], dict[str, tuple[int, ...]]]]:
    """method -> (method_config, tensor shapes) for the tiny base model."""
    return {
        "prompt_tuning": ({"num_virtual_tokens": 3}, {"prompt": (3, D)}),
        "p_tuning": ({"num_virtual_tokens": 3, "encoder_type": "lstm"}, {"prompt": (3, D)}),
        "prefix_tuning": ({"num_virtual_tokens": 3}, {"keys": KV3, "values": KV3}),
        "gist": ({"num_gist_tokens": 2, "next_position": 9}, {"keys": KV2, "values": KV2}),
        "accept": (ACCEPT, ACCEPT_SHAPES),
        "accept_scap": ({**ACCEPT, **SCAP}, {**ACCEPT_SHAPES, **SCAP_SHAPES}),
        "gist_embedding": ({"num_gist_tokens": 2}, {"gist_embeddings": (2, D)}),
    }


def build(
    fp: Fingerprint,
    name: str = "prompt_tuning",
    dtype: torch.dtype = torch.float32,
    shapes: dict[str, tuple[int, ...]] | None = None,
    config: dict[str, Any] | None = None,
) -> Artifact:
    """A deterministic artifact of spec `name` (override shapes/config to make bad ones)."""
    cfg, default_shapes = specs()[name]
    gen = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(s, generator=gen).to(dtype) for k, s in (shapes or default_shapes).items()}
    method = "accept" if name.startswith("accept") else name
    return make_artifact("task-a", method, config if config is not None else cfg, tensors, fp)


def assert_same(a: Artifact, b: Artifact) -> None:
    assert a.manifest == b.manifest
    assert sorted(a.tensors) == sorted(b.tensors)
    for k in a.tensors:
        assert a.tensors[k].dtype == b.tensors[k].dtype and torch.equal(a.tensors[k], b.tensors[k])


def refuse(
    data: bytes,
    exc: type[StoreError],
    tmp_path: Path,
    base: Fingerprint | None = None,
    limits: Limits | None = None,
) -> StoreError:
    """`data` is refused with exactly `exc`, from bytes and from a file, and the file is left as it was."""
    with pytest.raises(StoreError) as info:
        parse_and_validate(data, base, limits)
    assert type(info.value) is exc, f"{type(info.value).__name__}: {info.value}"
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(exc):
        validate_artifact(load(path, limits), base, limits)
    assert path.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    return info.value


def raw_safetensors(header: dict[str, Any], data: bytes) -> bytes:
    """A hand-crafted safetensors file (header not checked by anyone)."""
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


def with_manifest(artifact: Artifact, **changes: Any) -> bytes:
    """Serialize `artifact` with manifest fields replaced (sha256 left as computed over the tensors)."""
    return to_bytes(Artifact(dataclasses.replace(artifact.manifest, **changes), artifact.tensors))


# ---- round trips ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(specs()))
def test_round_trip_bytes_and_file(name: str, tiny_fingerprint: Fingerprint, tmp_path: Path) -> None:
    art = build(tiny_fingerprint, name)
    assert_same(art, parse_and_validate(to_bytes(art), tiny_fingerprint))
    path = save(art, tmp_path / "sub" / f"{name}.safetensors")
    loaded = load(path)
    validate_artifact(loaded, tiny_fingerprint)
    assert_same(art, loaded)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_round_trip_half_precision(dtype: torch.dtype, tiny_fingerprint: Fingerprint) -> None:
    art = build(tiny_fingerprint, "prefix_tuning", dtype)
    assert art.manifest.dtype == str(dtype).removeprefix("torch.")
    assert_same(art, parse_and_validate(to_bytes(art), tiny_fingerprint))


# ---- serving forms ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["prompt_tuning", "p_tuning", "gist_embedding"])
def test_embedding_prefix_forms(name: str, tiny_fingerprint: Fingerprint) -> None:
    art = build(tiny_fingerprint, name)
    sp = to_serving_form(art)
    (stored,) = art.tensors.values()
    assert sp.keys is None and sp.values is None and sp.added is None
    assert sp.embeds is not None and torch.equal(sp.embeds, stored)
    assert sp.next_position == sp.num_virtual_tokens == stored.shape[0]


def test_prefix_tuning_form(tiny_fingerprint: Fingerprint) -> None:
    art = build(tiny_fingerprint, "prefix_tuning")
    sp = to_serving_form(art)
    assert sp.embeds is None and sp.added is None and sp.keys is not None and sp.values is not None
    assert sp.keys.shape == sp.values.shape == (L, HKV, 3, DH)
    assert torch.equal(sp.keys, art.tensors["keys"]) and torch.equal(sp.values, art.tensors["values"])
    assert sp.next_position == sp.num_virtual_tokens == 3


def test_gist_form_continues_at_next_position(tiny_fingerprint: Fingerprint) -> None:
    sp = to_serving_form(build(tiny_fingerprint, "gist"))
    assert sp.keys is not None and sp.keys.shape == (L, HKV, 2, DH)
    assert sp.num_virtual_tokens == 2 and sp.next_position == 9


def loop_compose(weight: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """p_i = concat_k sum_j W[i,k,j] C[k,j,:], written out with explicit loops."""
    n, K, r = weight.shape
    rows = []
    for i in range(n):
        parts = []
        for k in range(K):
            acc = torch.zeros(codebook.shape[2], dtype=torch.float64)  # [d/K]
            for j in range(r):
                acc += weight[i, k, j].double() * codebook[k, j].double()
            parts.append(acc)
        rows.append(torch.cat(parts))  # [d]
    return torch.stack(rows)  # [n, d]


def test_accept_composition(tiny_fingerprint: Fingerprint) -> None:
    art = build(tiny_fingerprint, "accept")
    sp = to_serving_form(art)
    assert sp.added is None and sp.keys is None and sp.embeds is not None
    assert sp.embeds.shape == (3, D) and sp.next_position == 3
    expected = loop_compose(art.tensors["prompt_weight"], art.tensors["prompt_codebook"])
    torch.testing.assert_close(sp.embeds.double(), expected, rtol=1e-5, atol=1e-5)


def test_accept_scap_added_delta(tiny_fingerprint: Fingerprint) -> None:
    art = build(tiny_fingerprint, "accept_scap")
    sp = to_serving_form(art)
    assert sp.embeds is not None and sp.added is not None
    assert sp.embeds.shape == (3, D) and sp.added.shape == (2, D) and sp.next_position == 3
    expected = loop_compose(art.tensors["added_weight"], art.tensors["added_codebook"])
    torch.testing.assert_close(sp.added.double(), expected, rtol=1e-5, atol=1e-5)


# ---- refused: does not fit the base model / bad values ----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "shapes", "field"),
    [
        ("prompt_tuning", {"prompt": (3, 32)}, "prompt"),
        ("prompt_tuning", {"prompt": (4, D)}, "prompt"),
        ("prompt_tuning", {"prompt": (3, D, 1)}, "prompt"),
        ("p_tuning", {"prompt": (D, 3)}, "prompt"),
        ("prefix_tuning", {"keys": (L, 4, 3, DH), "values": (L, 4, 3, DH)}, "keys"),
        ("prefix_tuning", {"keys": (L, HKV, 3, DH), "values": (L + 1, HKV, 3, DH)}, "values"),
        ("gist", {"keys": (L, HKV, 2, 8), "values": (L, HKV, 2, 8)}, "keys"),
        ("accept", {"prompt_weight": (3, 4, 5), "prompt_codebook": (4, 5, 8)}, "prompt_codebook"),
        ("gist_embedding", {"gist_embeddings": (2, D + 1)}, "gist_embeddings"),
        ("prompt_tuning", {"prompt": (3, D), "extra": (1,)}, "extra"),
        ("prefix_tuning", {"keys": (L, HKV, 3, DH)}, "values"),
    ],
)
def test_wrong_shapes_refused(
    name: str, shapes: dict[str, tuple[int, ...]], field: str, tiny_fingerprint: Fingerprint, tmp_path: Path
) -> None:
    err = refuse(to_bytes(build(tiny_fingerprint, name, shapes=shapes)), ValidationError, tmp_path)
    assert err.field == field


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_refused(bad: float, tiny_fingerprint: Fingerprint, tmp_path: Path) -> None:
    art = build(tiny_fingerprint, "prefix_tuning")
    art.tensors["values"][1, 0, 2, 5] = bad
    art = make_artifact("task-a", "prefix_tuning", art.manifest.method_config, art.tensors, tiny_fingerprint)
    err = refuse(to_bytes(art), ValidationError, tmp_path, tiny_fingerprint)
    assert err.field == "values" and "NaN or Inf" in str(err)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.float64, torch.bool])
def test_disallowed_dtypes_refused(dtype: torch.dtype, tiny_fingerprint: Fingerprint, tmp_path: Path) -> None:
    err = refuse(to_bytes(build(tiny_fingerprint, "prompt_tuning", dtype)), ArtifactFormatError, tmp_path)
    assert err.field == "prompt"
    with pytest.raises(ValidationError):  # the in-memory path refuses it too
        validate_artifact(build(tiny_fingerprint, "prompt_tuning", dtype), tiny_fingerprint)


def test_manifest_dtype_mismatch_refused(tiny_fingerprint: Fingerprint, tmp_path: Path) -> None:
    data = with_manifest(build(tiny_fingerprint, "prompt_tuning"), dtype="float16")
    assert refuse(data, ArtifactFormatError, tmp_path).field == "dtype"


def test_mixed_dtypes_refused_at_build(tiny_fingerprint: Fingerprint) -> None:
    tensors = {"keys": torch.zeros(L, HKV, 3, DH), "values": torch.zeros(L, HKV, 3, DH, dtype=torch.float16)}
    with pytest.raises(ArtifactFormatError):
        make_artifact("task-a", "prefix_tuning", {"num_virtual_tokens": 3}, tensors, tiny_fingerprint)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"method": "lora"}, "method"),
        ({"method_config": {"num_virtual_tokens": 3, "bogus": 1}}, "method_config"),
        ({"method_config": {}}, "method_config"),
        ({"method_config": {"num_virtual_tokens": "3"}}, "num_virtual_tokens"),
        ({"method_config": {"num_virtual_tokens": 0}}, "num_virtual_tokens"),
    ],
)
def test_bad_method_or_config_refused(
    changes: dict[str, Any], field: str, tiny_fingerprint: Fingerprint, tmp_path: Path
) -> None:
    data = with_manifest(build(tiny_fingerprint, "prompt_tuning"), **changes)
    assert refuse(data, ValidationError, tmp_path, tiny_fingerprint).field == field


def test_too_many_virtual_tokens_refused(tiny_fingerprint: Fingerprint, tmp_path: Path) -> None:
    art = build(
        tiny_fingerprint, "prompt_tuning", shapes={"prompt": (9, D)}, config={"num_virtual_tokens": 9}
    )
    limits = Limits(max_virtual_tokens=8)
    assert refuse(to_bytes(art), TooLarge, tmp_path, tiny_fingerprint, limits).field == "num_virtual_tokens"


def test_format_version_mismatch_refused(tiny_fingerprint: Fingerprint, tmp_path: Path) -> None:
    data = with_manifest(build(tiny_fingerprint, "prompt_tuning"), format_version=3)
    err = refuse(data, ArtifactFormatError, tmp_path)
    assert err.field == "format_version" and "3" in str(err)


@pytest.mark.parametrize(
    ("changes", "word"),
    [
        ({"hidden_size": 128}, "hidden_size"),
        ({"num_layers": 3}, "num_layers"),
        ({"num_kv_heads": 4}, "num_kv_heads"),
        ({"embedding_hash": "0" * 32}, "embedding_hash"),
    ],
)
def test_base_model_mismatch_refused(
    changes: dict[str, Any], word: str, tiny_fingerprint: Fingerprint, tmp_path: Path
) -> None:
    other = dataclasses.replace(tiny_fingerprint, **changes)
    data = to_bytes(build(other, "prompt_tuning"))  # shapes fit the tiny model; the fingerprint does not
    err = refuse(data, ValidationError, tmp_path, tiny_fingerprint)
    assert err.field == "base_model" and word in str(err)
    assert from_bytes(data).manifest.base_model == other  # well formed; it just does not fit this model


# ---- refused: not a (valid) safetensors artifact ----------------------------------------------------------


def test_truncated_refused(tiny_fingerprint: Fingerprint, tmp_path: Path) -> None:
    data = to_bytes(build(tiny_fingerprint, "prefix_tuning"))
    for cut in (len(data) - 1, len(data) - 100, 40, 7, 0):
        refuse(data[:cut], ArtifactFormatError, tmp_path)


def test_tampered_tensor_bytes_refused(tiny_fingerprint: Fingerprint, tmp_path: Path) -> None:
    data = bytearray(to_bytes(build(tiny_fingerprint, "prompt_tuning")))
    data[-3] ^= 0x01
    err = refuse(bytes(data), ArtifactFormatError, tmp_path)
    assert err.field == "sha256" and "tampered" in str(err)


def test_manifest_sha_tampered_refused(tiny_fingerprint: Fingerprint, tmp_path: Path) -> None:
    data = with_manifest(build(tiny_fingerprint, "prompt_tuning"), sha256="0" * 64)
    assert refuse(data, ArtifactFormatError, tmp_path).field == "sha256"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00" * 4,
        random.Random(0).randbytes(4096),
        json.dumps({"prompt": [[0.0] * 4]}).encode(),
        b"PK\x03\x04" + b"\x00" * 64,
        struct.pack("<Q", 6) + b"[1, 2]",
        struct.pack("<Q", 8) + b"{not js}",
        struct.pack("<Q", 200_005) + b'{"a":' + b"[" * 200_000,  # nested deeper than the stack
    ],
    ids=["empty", "short", "random", "json", "zip", "json-list", "bad-json", "deep-json"],
)
def test_not_safetensors_refused(data: bytes, tmp_path: Path) -> None:
    refuse(data, ArtifactFormatError, tmp_path)


def test_safetensors_without_manifest_refused(tmp_path: Path) -> None:
    data = bytes(st_save({"prompt": torch.zeros(3, D)}))
    assert refuse(data, ArtifactFormatError, tmp_path).field == "manifest"


@pytest.mark.parametrize(
    "manifest", ["not json", "[1]", '"str"', "[" * 50_000, '{"format_version": 1}', "BASE_MODEL_NOT_OBJECT"]
)
def test_malformed_manifest_refused(manifest: str, tiny_fingerprint: Fingerprint, tmp_path: Path) -> None:
    if manifest == "BASE_MODEL_NOT_OBJECT":
        good = build(tiny_fingerprint, "prompt_tuning").manifest.to_dict()
        manifest = json.dumps({**good, "base_model": "tiny-llama"})
    data = bytes(st_save({"prompt": torch.zeros(3, D)}, metadata={"softserve": manifest}))
    refuse(data, ArtifactFormatError, tmp_path)


class _TouchOnUnpickle:
    """Unpickling this opens `path` for writing, which creates the file."""

    def __init__(self, path: Path, how: str) -> None:
        self.path, self.how = path, how

    def __reduce__(self) -> tuple[Any, ...]:
        if self.how == "open":
            return (open, (str(self.path), "w"))
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("how", ["open", "system"])
@pytest.mark.parametrize("container", ["pickle", "torch.save"])
def test_pickle_payload_never_runs(how: str, container: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = {"prompt": _TouchOnUnpickle(marker, how)}
    if container == "pickle":
        data = pickle.dumps(payload)
    else:
        buf = io.BytesIO()
        torch.save(payload, buf)
        data = buf.getvalue()
    work = tmp_path / "work"
    work.mkdir()
    refuse(data, ArtifactFormatError, work)
    assert not marker.exists()


# ---- refused: sizes and offsets ---------------------------------------------------------------------------


def test_file_over_limit_refused(tiny_fingerprint: Fingerprint, tmp_path: Path) -> None:
    data = to_bytes(build(tiny_fingerprint, "prompt_tuning"))
    refuse(data, TooLarge, tmp_path, limits=Limits(max_file_bytes=len(data) - 1))


def test_huge_declared_header_refused(tmp_path: Path) -> None:
    for declared in (2**40, 2**64 - 1, Limits().max_header_bytes + 1):
        err = refuse(struct.pack("<Q", declared) + b'{"a": 1}', ArtifactFormatError, tmp_path)
        assert "header" in str(err)


@pytest.mark.parametrize("shape", [[2**31, 2**31], [2**62], [1 << 20, 1 << 20, 1 << 20]])
def test_huge_declared_shape_refused(shape: list[int], tmp_path: Path) -> None:
    data = raw_safetensors(
        {"prompt": {"dtype": "F32", "shape": shape, "data_offsets": [0, 16]}}, b"\x00" * 16
    )
    assert refuse(data, TooLarge, tmp_path).field == "prompt"


def test_too_many_tensors_refused(tiny_fingerprint: Fingerprint, tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.zeros(2) for i in range(Limits().max_tensors + 1)}
    art = make_artifact("task-a", "prompt_tuning", {"num_virtual_tokens": 1}, tensors, tiny_fingerprint)
    refuse(to_bytes(art), TooLarge, tmp_path)


def test_overlapping_offsets_refused(tmp_path: Path) -> None:
    header = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    }
    err = refuse(raw_safetensors(header, b"\x00" * 24), ArtifactFormatError, tmp_path)
    assert "overlap" in str(err)


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [4], "data_offsets": [0, 32]},  # past the end
        {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},  # size does not match the shape
        {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]},
        {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]},
        {"dtype": "F32", "shape": [4], "data_offsets": [0]},
        {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]},
        {"dtype": "F64", "shape": [2], "data_offsets": [0, 16]},
        "not an entry",
    ],
)
def test_bad_table_entries_refused(entry: Any, tmp_path: Path) -> None:
    refuse(raw_safetensors({"prompt": entry}, b"\x00" * 16), ArtifactFormatError, tmp_path)
