"""Artifact file format: one safetensors file, JSON manifest in its metadata, sha256 over tensor bytes.

Nothing here ever unpickles: the header is parsed and bounded by hand before safetensors reads it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from prompt_store import strict_json
from prompt_store.errors import ArtifactFormatError, TooLarge
from prompt_store.fileio import atomic_write
from prompt_store.task_id import validate_task_id
from prompt_store.types import (
    FORMAT_VERSION,
    RAW_FORMAT,
    READ_FORMAT_VERSIONS,
    SUPPORTED_DTYPES,
    Artifact,
    Fingerprint,
    InputFormat,
    Limits,
    Manifest,
)

METADATA_KEY = "softserve"
_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of every tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def make_artifact(
    task_id: str,
    method: str,
    method_config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    base_model: Fingerprint,
    notes: str = "",
    input_format: InputFormat = RAW_FORMAT,
) -> Artifact:
    """Build an artifact: tensors moved to CPU + contiguous, dtype and sha256 filled in; `input_format`:
    how training formatted the request text (raw unless the trainer says otherwise)."""
    validate_task_id(task_id)
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    dtypes = {str(t.dtype).removeprefix("torch.") for t in clean.values()}
    if len(dtypes) != 1:
        raise ArtifactFormatError(f"all tensors must share one dtype, got {sorted(dtypes)}", field="dtype")
    manifest = Manifest(
        task_id=task_id,
        method=method,
        method_config=dict(method_config),
        base_model=base_model,
        dtype=dtypes.pop(),
        sha256=tensors_sha256(clean),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        notes=notes,
        input_format=input_format,
    )
    return Artifact(manifest=manifest, tensors=clean)


def with_version(artifact: Artifact, version: int) -> Artifact:
    return Artifact(
        manifest=dataclasses.replace(artifact.manifest, version=version), tensors=artifact.tensors
    )


def manifest_json(manifest: Manifest) -> str:
    """The one stored form of a manifest (compact, non-ASCII kept): what is stored is what gets validated."""
    try:
        return strict_json.dumps(manifest.to_dict())
    except (TypeError, ValueError) as exc:
        raise ArtifactFormatError(f"manifest cannot be stored as JSON: {exc}", field="manifest") from exc


def to_bytes(artifact: Artifact) -> bytes:
    meta = {METADATA_KEY: manifest_json(artifact.manifest)}
    return bytes(st_save(artifact.tensors, metadata=meta))


def read_header(data: bytes, limits: Limits) -> dict[str, Any]:
    """Parse and bound the safetensors header without trusting any of it."""
    if len(data) > limits.max_file_bytes:
        raise TooLarge(f"artifact is {len(data)} bytes; the limit is {limits.max_file_bytes}", field="file")
    if len(data) < 8:
        raise ArtifactFormatError(
            "not a safetensors file: shorter than its 8-byte header length", field="file"
        )
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > limits.max_header_bytes:
        raise ArtifactFormatError(
            f"not a valid safetensors file: declared header of {header_len} bytes exceeds the "
            f"limit of {limits.max_header_bytes}",
            field="file",
        )
    if 8 + header_len > len(data):
        raise ArtifactFormatError("truncated safetensors file: header runs past the end", field="file")
    raw = data[8 : 8 + header_len]
    if not raw.lstrip().startswith(b"{"):
        raise ArtifactFormatError("not a safetensors file: header is not a JSON object", field="file")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # ValueError: bad JSON, bad UTF-8, a 5,000-digit integer
        # RecursionError: a deeply nested header (`{"a":[[[[...`) fits in the byte limit but not the stack.
        raise ArtifactFormatError(
            f"not a safetensors file: header is not valid JSON ({exc})", field="file"
        ) from exc
    if not isinstance(header, dict):
        raise ArtifactFormatError("not a safetensors file: header is not a JSON object", field="file")
    return header


def check_tensor_table(header: dict[str, Any], data_len: int, limits: Limits) -> None:
    """Bounds, dtypes and non-overlapping offsets of every entry, checked before any tensor is built."""
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    if len(entries) > limits.max_tensors:
        raise TooLarge(
            f"artifact has {len(entries)} tensors; the limit is {limits.max_tensors}", field="file"
        )
    spans = []
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            raise ArtifactFormatError(f"tensor {name!r}: malformed header entry", field=name)
        st_dtype = entry.get("dtype")
        if st_dtype not in _ST_DTYPES:
            raise ArtifactFormatError(
                f"tensor {name!r}: dtype {st_dtype!r} is not allowed (float32, float16, bfloat16)",
                field=name,
            )
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise ArtifactFormatError(f"tensor {name!r}: malformed shape {shape!r}", field=name)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ArtifactFormatError(f"tensor {name!r}: malformed data_offsets", field=name)
        numel = 1
        for s in shape:
            numel *= s
        itemsize = SUPPORTED_DTYPES[_ST_DTYPES[st_dtype]].itemsize
        start, end = offsets
        if numel * itemsize > limits.max_file_bytes:
            raise TooLarge(f"tensor {name!r}: declared shape {shape} is over the size limit", field=name)
        if not (0 <= start <= end <= data_len) or end - start != numel * itemsize:
            raise ArtifactFormatError(
                f"tensor {name!r}: data_offsets {offsets} do not match shape {shape} and the file size",
                field=name,
            )
        spans.append((start, end, name))
    spans.sort()
    for (_, prev_end, prev), (start, _, name) in zip(spans, spans[1:], strict=False):
        if start < prev_end:
            raise ArtifactFormatError(f"tensors {prev!r} and {name!r} overlap in the file", field=name)


def _int_field(d: dict[str, Any], key: str, default: int | None = None) -> int:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ArtifactFormatError(
            f"manifest.{key} must be a non-negative integer, got {strict_json.shown(repr(value))}", field=key
        )
    return value


def _str_field(d: dict[str, Any], key: str, default: str | None = None) -> str:
    value = d.get(key, default)
    if not isinstance(value, str):
        raise ArtifactFormatError(
            f"manifest.{key} must be a string, got {strict_json.shown(repr(value))}", field=key
        )
    return value


def parse_manifest(meta: dict[str, Any], limits: Limits) -> Manifest:
    """The manifest in safetensors metadata, strictly: finite numbers, 64-bit integers, valid Unicode."""
    raw = meta.get(METADATA_KEY)
    if not isinstance(raw, str):
        raise ArtifactFormatError(f"safetensors metadata has no {METADATA_KEY!r} manifest", field="manifest")
    if len(raw) > limits.max_manifest_chars:
        raise TooLarge(
            f"manifest is {len(raw)} characters; the limit is {limits.max_manifest_chars}", field="manifest"
        )
    try:
        d = strict_json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ArtifactFormatError(f"manifest is malformed: {exc!s}", field="manifest") from exc
    if not isinstance(d, dict):
        raise ArtifactFormatError("manifest must be a JSON object", field="manifest")
    for key in ("task_id", "method", "method_config", "base_model", "dtype", "sha256", "format_version"):
        if key not in d:
            raise ArtifactFormatError(f"manifest is malformed: it has no {key!r}", field=key)
    format_version = d["format_version"]
    if type(format_version) is not int or format_version not in READ_FORMAT_VERSIONS:
        raise ArtifactFormatError(
            f"format_version {strict_json.shown(repr(format_version))} is not supported "
            f"(this build reads {', '.join(map(str, READ_FORMAT_VERSIONS))})",
            field="format_version",
        )
    if format_version >= 2 and "input_format" not in d:
        raise ArtifactFormatError(
            f"manifest is malformed: format_version {format_version} needs 'input_format'",
            field="input_format",
        )
    # version 1 predates input_format: its tasks ran on the raw text, and still do
    input_format = InputFormat.from_dict(d["input_format"]) if format_version >= 2 else RAW_FORMAT
    if not isinstance(d["base_model"], dict):
        raise ArtifactFormatError("manifest.base_model must be an object", field="base_model")
    if not isinstance(d["method_config"], dict):
        raise ArtifactFormatError("manifest.method_config must be an object", field="method_config")
    return Manifest(
        task_id=validate_task_id(d["task_id"]),
        method=_str_field(d, "method"),
        method_config=d["method_config"],
        base_model=Fingerprint.from_dict(d["base_model"]),
        dtype=_str_field(d, "dtype"),
        sha256=_str_field(d, "sha256"),
        version=_int_field(d, "version", 0),
        created_at=_str_field(d, "created_at", ""),
        notes=_str_field(d, "notes", ""),
        format_version=FORMAT_VERSION,
        input_format=input_format,
    )


def from_bytes(data: bytes, limits: Limits | None = None) -> Artifact:
    """Parse, bound and verify an artifact (format, dtypes, offsets, sha256). Method checks are separate."""
    limits = limits or Limits()
    header = read_header(data, limits)
    header_len = struct.unpack("<Q", data[:8])[0]
    check_tensor_table(header, len(data) - 8 - header_len, limits)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ArtifactFormatError("safetensors __metadata__ must be an object", field="manifest")
    manifest = parse_manifest(meta, limits)
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ArtifactFormatError(f"safetensors could not read the file: {exc}", field="file") from exc
    for name, t in tensors.items():
        if str(t.dtype).removeprefix("torch.") != manifest.dtype:
            raise ArtifactFormatError(
                f"tensor {name!r} has dtype {t.dtype}, manifest says {manifest.dtype}", field="dtype"
            )
    actual = tensors_sha256(tensors)
    if actual != manifest.sha256:
        raise ArtifactFormatError(
            f"sha256 mismatch: manifest says {manifest.sha256[:16]}..., tensors hash to {actual[:16]}... "
            "(file truncated or tampered)",
            field="sha256",
        )
    return Artifact(manifest=manifest, tensors=tensors)


def save(artifact: Artifact, path: str | os.PathLike[str]) -> Path:
    """Write atomically: temp file in the same directory, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, to_bytes(artifact))
    return path


def load(path: str | os.PathLike[str], limits: Limits | None = None) -> Artifact:
    limits = limits or Limits()
    path = Path(path)
    size = path.stat().st_size
    if size > limits.max_file_bytes:
        raise TooLarge(f"artifact is {size} bytes; the limit is {limits.max_file_bytes}", field="file")
    return from_bytes(path.read_bytes(), limits)
