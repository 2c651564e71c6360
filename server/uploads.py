"""What an upload holds: one softserve artifact, or one PEFT adapter (two files, or a zip) — never a guess.

Files are classified by name before anything is inflated. Two adapter configs, two adapter weights, two
artifacts, or an artifact next to an adapter is refused with 400 naming the files. Zip members are read
through bounded streams: a member whose CRC or declared size lies is a 400, and nothing is ever inflated
beyond its declared size or the body limit.
"""

from __future__ import annotations

import dataclasses
import io
import zipfile
import zlib

from prompt_store import Artifact, Fingerprint, Limits, parse_and_validate
from prompt_store.peft_import import CONFIG_NAME, WEIGHTS_NAME, import_peft_files
from server.errors import BadRequest, BodyTooLarge, safe_text

MAX_ZIP_MEMBERS = 16
ZIP_MAGIC = b"PK\x03\x04"
ARTIFACT_SUFFIX = ".safetensors"
MAX_NAMES_SHOWN = 8

# (name as sent or as stored in the zip, content; b"" for zip members that are never read)
Files = list[tuple[str, bytes]]


def base_name(name: str) -> str:
    return name.replace("\\", "/").rsplit("/", 1)[-1]


def _kinds(names: list[str]) -> dict[str, list[str]]:
    """Names that are a PEFT config, PEFT weights, or a softserve artifact (the rest is ignored)."""
    kinds: dict[str, list[str]] = {"config": [], "weights": [], "artifact": []}
    for name in names:
        base = base_name(name)
        if base == CONFIG_NAME:
            kinds["config"].append(name)
        elif base == WEIGHTS_NAME:
            kinds["weights"].append(name)
        elif base.lower().endswith(ARTIFACT_SUFFIX):
            kinds["artifact"].append(name)
    return kinds


def _shown(names: list[str]) -> str:
    listed = ", ".join(repr(safe_text(n, 100)) for n in names[:MAX_NAMES_SHOWN])
    more = len(names) - MAX_NAMES_SHOWN
    return listed + (f" and {more} more" if more > 0 else "")


def refuse_ambiguous(names: list[str], where: str) -> dict[str, list[str]]:
    """Raise BadRequest (naming the files) unless the names describe at most one thing to import."""
    kinds = _kinds(names)
    for kind, what in (("config", CONFIG_NAME), ("weights", WEIGHTS_NAME), ("artifact", "artifact")):
        if len(kinds[kind]) > 1:
            raise BadRequest(
                f"{where} holds {len(kinds[kind])} {what} files ({_shown(kinds[kind])}); "
                "upload exactly one artifact or one adapter",
                field="file",
            )
    adapter = kinds["config"] + kinds["weights"]
    if kinds["artifact"] and adapter:
        raise BadRequest(
            f"{where} holds both a softserve artifact ({_shown(kinds['artifact'])}) and a PEFT adapter "
            f"({_shown(adapter)}); upload one of them",
            field="file",
        )
    return kinds


def unzip(data: bytes, max_bytes: int) -> Files:
    """The members of an uploaded zip that matter, read bounded; the others by name only (never read)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = [i for i in archive.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError) as exc:
        raise BadRequest(f"file is not a valid zip archive: {safe_text(str(exc))}", field="file") from exc
    if len(members) > MAX_ZIP_MEMBERS:
        raise BadRequest(f"zip has {len(members)} files; the limit is {MAX_ZIP_MEMBERS}", field="file")
    kinds = refuse_ambiguous([i.filename for i in members], "the zip")
    wanted = {name for names in kinds.values() for name in names}
    total = sum(i.file_size for i in members if i.filename in wanted)
    if total > max_bytes:
        raise BodyTooLarge(f"zip inflates to {total} bytes; the limit is {max_bytes}", field="file")
    return [(i.filename, _read_member(archive, i) if i.filename in wanted else b"") for i in members]


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """One member, never more than its declared size (zipfile stops there); a CRC or size lie is a 400."""
    name = safe_text(info.filename, 100)
    try:
        with archive.open(info) as member:
            data = member.read(info.file_size + 1)
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError) as exc:
        raise BadRequest(f"zip member {name!r} is corrupt: {safe_text(str(exc))}", field="file") from exc
    except (RuntimeError, NotImplementedError) as exc:  # encrypted, or an unsupported compression method
        raise BadRequest(f"zip member {name!r} cannot be read: {safe_text(str(exc))}", field="file") from exc
    if len(data) != info.file_size:
        raise BadRequest(
            f"zip member {name!r} holds {len(data)} bytes but declares {info.file_size}", field="file"
        )
    return data


def parse_upload(files: Files, task_id: str, base: Fingerprint, limits: Limits, max_bytes: int) -> Artifact:
    """One softserve artifact, or a PEFT adapter (two files or one zip) -> a validated artifact."""
    if len(files) == 1 and not files[0][1].startswith(ZIP_MAGIC):
        name, data = files[0]
        if base_name(name) not in (CONFIG_NAME, WEIGHTS_NAME):
            return _artifact(data, task_id, base, limits)
    if len(files) == 1:
        files, where = unzip(files[0][1], max_bytes), "the zip"
    else:
        zips = [name for name, data in files if data.startswith(ZIP_MAGIC)]
        if zips:
            raise BadRequest(f"a zip ({_shown(zips)}) must be the only file of its upload", field="file")
        where = "the upload"
    kinds = refuse_ambiguous([name for name, _ in files], where)
    if kinds["config"] and kinds["weights"]:
        return import_peft_files({base_name(n): d for n, d in files}, task_id, base, limits)
    if kinds["artifact"] and not kinds["config"] and not kinds["weights"]:
        (name,) = kinds["artifact"]
        return _artifact(next(d for n, d in files if n == name), task_id, base, limits)
    raise BadRequest(
        "upload one softserve .safetensors artifact, or a PEFT adapter: adapter_config.json + "
        f"adapter_model.safetensors (as two files or one zip); got {_shown([n for n, _ in files])}",
        field="file",
    )


def _artifact(data: bytes, task_id: str, base: Fingerprint, limits: Limits) -> Artifact:
    artifact = parse_and_validate(data, base, limits)
    if artifact.task_id != task_id:
        manifest = dataclasses.replace(artifact.manifest, task_id=task_id)
        artifact = Artifact(manifest=manifest, tensors=artifact.tensors)
    return artifact
