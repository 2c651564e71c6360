"""No 500 for bad input, over real HTTP (uvicorn): lone surrogates, NaN/Infinity, integers that overflow, zip
members that lie. Every case is a 4xx whose body is strict JSON naming the field, and the server still serves.

Bodies are raw bytes, so what Python's json would accept (NaN, "\\ud800") really reaches the server.
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from api_helpers import prompt_artifact_bytes
from live_server import threaded_server
from upload_helpers import (
    artifact_with_manifest,
    compact,
    manifest_dict,
    multipart,
    peft_adapter,
    put_files,
    raw_header_file,
    strict_json,
    zip_of,
)

from prompt_store import Fingerprint
from prompt_store.types import FORMAT_VERSION


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, Fingerprint]]:
    folder = tmp_path_factory.mktemp("bad-values")
    with threaded_server(folder) as (url, state), httpx.Client(base_url=url, timeout=30) as client:
        yield client, state.runner.fingerprint


def assert_4xx_naming(response: httpx.Response, field: str) -> Any:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    body = strict_json(response)
    assert field in response.text, (field, response.text[:300])
    if "detail" in body:  # request validation: each entry keeps its location and its message
        assert all("loc" in e and "msg" in e for e in body["detail"]), body
    else:
        assert body["error"]["message"], body
    return body


JSON_CASES = [
    ("/generate", b'{"prompt": "a\\ud800b", "max_new_tokens": 2}', "prompt"),
    ("/generate", b'{"messages": [{"role": "user", "content": "\\udc00"}]}', "content"),
    ("/generate", b'{"task_id": "\\ud800", "prompt": "x"}', "task_id"),
    ("/generate", b'{"prompt": "x", "stop": ["\\ud800"]}', "stop"),
    ("/generate", b'{"prompt": "x", "temperature": NaN}', "temperature"),
    ("/generate", b'{"prompt": "x", "top_p": NaN}', "top_p"),
    ("/generate", b'{"prompt": "x", "temperature": Infinity}', "temperature"),
    ("/generate", b'{"prompt": "x", "top_k": -Infinity}', "top_k"),
    ("/generate", b'{"prompt": "x", "seed": 1e400}', "seed"),
    ("/generate", b'{"prompt": "x", "max_new_tokens": 1e400}', "max_new_tokens"),
    ("/generate", b'{"prompt": NaN}', "prompt"),
    ("/generate", b'{"prompt": ' + b"[" * 500 + b"]" * 500 + b"}", "prompt"),  # deep, yet parsable
    (
        "/generate",
        b'{"messages": [{"role": "user", "content": ' + b'{"a":' * 500 + b"1" + b"}" * 501 + b"]}",
        "content",
    ),
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', "temperature"),
    ("/v1/completions", b'{"model": "\\ud800", "prompt": "x"}', "model"),
    ("/v1/completions", b'{"prompt": "x", "stop": "\\ud800"}', "stop"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "top_p": NaN}', "top_p"),
    ("/tasks/t/compress", b'{"gist_task": "g", "instruction": "\\ud800"}', "instruction"),
    ("/tasks/t/compress", b'{"gist_task": "\\ud800", "instruction": "x"}', "gist_task"),
]


@pytest.mark.parametrize(("path", "body", "field"), JSON_CASES, ids=[f"{p}:{f}" for p, _, f in JSON_CASES])
def test_json_bodies_are_4xx_with_a_safe_body(server, path: str, body: bytes, field: str) -> None:  # type: ignore[no-untyped-def]
    client, _ = server
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert_4xx_naming(r, field)


def test_the_echoed_value_is_escaped_and_the_limit_is_kept(server) -> None:  # type: ignore[no-untyped-def]
    client, _ = server
    headers = {"content-type": "application/json"}
    r = client.post("/generate", content=b'{"prompt": "x", "temperature": NaN}', headers=headers)
    (entry,) = strict_json(r)["detail"]
    assert entry["loc"] == ["body", "temperature"] and entry["input"] == "nan" and "5" in entry["msg"]
    r = client.post("/generate", content=b'{"prompt": "a\\ud800b"}', headers=headers)
    (entry,) = strict_json(r)["detail"]
    assert entry["loc"] == ["body", "prompt"] and entry["input"] == "a\\ud800b"


def manifest_cases(base: Fingerprint) -> dict[str, str]:
    good = manifest_dict("t", base)
    text = compact(good)
    fp = good["base_model"]
    return {
        # escaped as JSON "\ud800": the only way a lone surrogate travels in UTF-8 text
        "notes-surrogate": compact({**good, "notes": "\ud800"}, ascii_only=True),
        "created_at-surrogate": compact({**good, "created_at": "\udfff"}, ascii_only=True),
        "method-surrogate": compact({**good, "method": "\ud800"}, ascii_only=True),
        "dtype-surrogate": compact({**good, "dtype": "\ud800"}, ascii_only=True),
        "sha256-surrogate": compact({**good, "sha256": "\ud800"}, ascii_only=True),
        "embedding_hash-surrogate": compact(
            {**good, "base_model": {**fp, "embedding_hash": "\udbff"}}, ascii_only=True
        ),
        "version-1e400": text.replace('"version":0', '"version":1e400'),
        "version-2**70": text.replace('"version":0', f'"version":{2**70}'),
        "version-5000-digits": text.replace('"version":0', '"version":1' + "0" * 5000),
        "format_version-1e400": text.replace(f'"format_version":{FORMAT_VERSION}', '"format_version":1e400'),
        "format_version-NaN": text.replace(f'"format_version":{FORMAT_VERSION}', '"format_version":NaN'),
        "hidden_size-Infinity": text.replace(f'"hidden_size":{base.hidden_size}', '"hidden_size":Infinity'),
        "num_layers-2**64": text.replace(f'"num_layers":{base.num_layers}', f'"num_layers":{2**64}'),
        "num_virtual_tokens-NaN": text.replace('"num_virtual_tokens":4', '"num_virtual_tokens":NaN'),
    }


CASE_NAMES = sorted(manifest_cases(Fingerprint("names-only", 64, 2, 2, 16, 259)))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_manifest_values_are_4xx(server, case: str) -> None:  # type: ignore[no-untyped-def]
    client, base = server
    raw = manifest_cases(base)[case]
    assert raw != compact(manifest_dict("t", base)), "the case must change the manifest"
    r = put_files(client, "t", [("t.safetensors", artifact_with_manifest(raw, base))])
    assert_4xx_naming(r, "manifest")


@pytest.mark.parametrize(
    ("header", "field"),
    [
        (
            b'{"prompt": {"dtype": "F32", "shape": [1' + b"0" * 5000 + b', 64], "data_offsets": [0, 16]}}',
            "file",
        ),
        (b'{"prompt": {"dtype": "F32", "shape": [NaN, 64], "data_offsets": [0, 16]}}', "shape"),
        (b'{"prompt": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 1e400]}}', "data_offsets"),
        (b'{"pr\\ud800": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}', "manifest"),
    ],
    ids=["5000-digit-dim", "NaN-dim", "1e400-offset", "surrogate-name"],
)
def test_safetensors_header_values_are_4xx(server, header: bytes, field: str) -> None:  # type: ignore[no-untyped-def]
    client, _ = server
    r = put_files(client, "t", [("t.safetensors", raw_header_file(header))])
    assert_4xx_naming(r, field)


def _lying_zip(base: Fingerprint, how: str) -> bytes:
    files = peft_adapter(base)
    if how == "crc":
        data = bytearray(zip_of(files))
        at = bytes(data).index(files["adapter_config.json"][:24])
        data[at] ^= 0x01  # stored (not compressed): the content changes, the CRC stays
        return bytes(data)
    if how == "utf8-name":
        data = bytearray(zip_of({"adapter_config.json": b"{}", "x": b""}))
        for sig, flag_at, name_at in ((b"PK\x01\x02", 8, 46), (b"PK\x03\x04", 6, 30)):
            at = bytes(data).rindex(sig)
            struct.pack_into("<H", data, at + flag_at, 0x800)  # names are UTF-8 ...
            data[at + name_at] = 0xFF  # ... but this one is not
        return bytes(data)
    padded = {**files, "adapter_model.safetensors": files["adapter_model.safetensors"] + b"\0" * 100_000}
    data = bytearray(zip_of(padded, zipfile.ZIP_DEFLATED))
    declared = 10 if how == "size-smaller" else 10_000_000
    central = bytes(data).rindex(b"PK\x01\x02")  # the weights are the last member
    local = bytes(data).index(b"PK\x03\x04", bytes(data).index(b"PK\x03\x04") + 4)
    struct.pack_into("<I", data, central + 24, declared)
    struct.pack_into("<I", data, local + 22, declared)
    return bytes(data)


@pytest.mark.parametrize("how", ["crc", "size-smaller", "size-bigger", "utf8-name"])
def test_zip_members_that_lie_are_400(server, how: str) -> None:  # type: ignore[no-untyped-def]
    client, base = server
    r = put_files(client, "z", [("adapter.zip", _lying_zip(base, how))])
    assert r.status_code in (400, 413), (r.status_code, r.text[:300])
    assert_4xx_naming(r, "file")


def test_filenames_that_are_not_utf8_are_echoed_safely(server) -> None:  # type: ignore[no-untyped-def]
    client, base = server
    art = prompt_artifact_bytes("t", base)
    body, headers = multipart([(b"\xed\xa0\x80.safetensors", art), (b"\xff\xfe.safetensors", art)])
    r = client.put("/tasks/t", content=body, headers=headers)
    assert r.status_code == 400
    assert_4xx_naming(r, "artifact")


def test_after_every_case_the_server_still_serves(server) -> None:  # type: ignore[no-untyped-def]
    client, base = server
    assert put_files(client, "ok", [("ok.safetensors", prompt_artifact_bytes("ok", base))]).status_code == 201
    r = client.post("/generate", json={"task_id": "ok", "prompt": "still here", "max_new_tokens": 2})
    assert r.status_code == 200, r.text
    assert client.get("/tasks").status_code == 200
