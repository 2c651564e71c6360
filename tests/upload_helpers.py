"""Builders for hostile uploads: artifacts with hand-written manifests, PEFT adapters, zips, raw multipart."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from typing import Any

import httpx
import torch
from safetensors.torch import save as st_save

from prompt_store import Fingerprint, make_artifact
from prompt_store.artifact import METADATA_KEY

BOUNDARY = "softserve-test-boundary"


def compact(manifest: dict[str, Any], ascii_only: bool = False) -> str:
    """A manifest as a careful client writes it: compact, keys sorted, non-ASCII as is (or escaped)."""
    return json.dumps(manifest, sort_keys=True, ensure_ascii=ascii_only, separators=(",", ":"))


def prompt_tensors(base: Fingerprint, m: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"prompt": torch.randn(m, base.hidden_size, generator=gen)}  # [m, d]


def manifest_dict(
    task_id: str, base: Fingerprint, m: int = 4, seed: int = 0, **changes: Any
) -> dict[str, Any]:
    """A valid prompt_tuning manifest (sha256 of prompt_tensors(base, m, seed)) with `changes` applied."""
    art = make_artifact(
        task_id, "prompt_tuning", {"num_virtual_tokens": m}, prompt_tensors(base, m, seed), base
    )
    return {**art.manifest.to_dict(), **changes}


def artifact_with_manifest(raw_manifest: str, base: Fingerprint, m: int = 4, seed: int = 0) -> bytes:
    """A safetensors file whose manifest is exactly `raw_manifest` (any text, valid or not)."""
    return bytes(st_save(prompt_tensors(base, m, seed), metadata={METADATA_KEY: raw_manifest}))


def raw_header_file(header: bytes, data_bytes: int = 16) -> bytes:
    """A safetensors-shaped file with a hand-written header."""
    return struct.pack("<Q", len(header)) + header + b"\0" * data_bytes


def peft_adapter(base: Fingerprint, m: int = 4, seed: int = 1) -> dict[str, bytes]:
    """A PEFT PROMPT_TUNING adapter for `base`: {adapter_config.json, adapter_model.safetensors}."""
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": m,
        "token_dim": base.hidden_size,
    }
    gen = torch.Generator().manual_seed(seed)
    weights = {"prompt_embeddings": torch.randn(m, base.hidden_size, generator=gen)}  # [m, d]
    return {"adapter_config.json": json.dumps(config).encode(), "adapter_model.safetensors": st_save(weights)}


def zip_of(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buf.getvalue()


def multipart(files: list[tuple[bytes, bytes]]) -> tuple[bytes, dict[str, str]]:
    """A multipart body of `file` fields from (raw filename bytes, content): any bytes, even invalid UTF-8."""
    parts = []
    for filename, content in files:
        head = b'Content-Disposition: form-data; name="file"; filename="' + filename + b'"\r\n'
        head += b"Content-Type: application/octet-stream\r\n\r\n"
        parts.append(b"--" + BOUNDARY.encode() + b"\r\n" + head + content + b"\r\n")
    body = b"".join(parts) + b"--" + BOUNDARY.encode() + b"--\r\n"
    return body, {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def put_files(client: httpx.Client, task_id: str, files: list[tuple[str, bytes]]) -> httpx.Response:
    body, headers = multipart([(name.encode(), data) for name, data in files])
    return client.put(f"/tasks/{task_id}", content=body, headers=headers)


def strict_json(response: httpx.Response) -> Any:
    """The body as strict JSON (no NaN/Infinity), valid UTF-8: what any client can read."""

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} in a response body")

    return json.loads(response.content.decode("utf-8"), parse_constant=refuse)
