"""Task management: upload (artifact or PEFT adapter), list, inspect, delete."""

from __future__ import annotations

import dataclasses
import io
import zipfile
from typing import Annotated

from fastapi import APIRouter, File, Response, UploadFile
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor

from prompt_store import Artifact, parse_and_validate, validate_artifact, validate_task_id
from prompt_store.backends import ChangeEvent, TaskInfo
from prompt_store.peft_import import import_peft_files
from server.deps import AdminKey, ApiKey, StateDep
from server.errors import BadRequest, BodyTooLarge
from server.gist import compress
from server.schemas import ERROR_RESPONSES, CompressRequest, TaskList, TaskResponse
from server.state import ServerState
from server.warmup import warm_task


class TaskPathConvertor(Convertor[str]):
    """Like starlette's `path`, but newlines too: with `.*` a trailing `%0A` would be cut off (and `$`
    matches before it), so `/tasks/x%0A` acted on task `x`. Everything sent reaches validate_task_id."""

    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("taskpath", TaskPathConvertor())

WARM_WAIT_S = 5.0  # an upload waits at most this long for the engine to build the new prefix

router = APIRouter(prefix="/tasks", tags=["tasks"], responses=ERROR_RESPONSES)

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
MAX_ZIP_MEMBERS = 16


def _task_response(info: TaskInfo) -> TaskResponse:
    return TaskResponse(
        task_id=info.task_id,
        version=info.version,
        method=info.method,
        sha256=info.sha256,
        created_at=info.created_at,
        versions=list(info.versions),
    )


def _unzip(data: bytes, max_bytes: int) -> dict[str, bytes]:
    """Members of a zipped PEFT adapter by base name; sizes bounded before anything is inflated."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise BadRequest(f"file is not a valid zip archive: {exc}", field="file") from exc
    members = [i for i in archive.infolist() if not i.is_dir()]
    if len(members) > MAX_ZIP_MEMBERS:
        raise BadRequest(f"zip has {len(members)} files; the limit is {MAX_ZIP_MEMBERS}", field="file")
    total = sum(i.file_size for i in members)
    if total > max_bytes:
        raise BodyTooLarge(f"zip inflates to {total} bytes; the limit is {max_bytes}", field="file")
    wanted = {
        i.filename.rsplit("/", 1)[-1]: i for i in members if i.filename.rsplit("/", 1)[-1] in PEFT_FILES
    }
    return {name: archive.read(info) for name, info in wanted.items()}


def parse_upload(state: ServerState, task_id: str, files: dict[str, bytes]) -> Artifact:
    """One safetensors artifact, or a PEFT adapter (two files or a zip) -> validated artifact."""
    base, limits = state.runner.fingerprint, state.limits
    if len(files) == 1:
        name, data = next(iter(files.items()))
        if data[:4] == b"PK\x03\x04":
            files = _unzip(data, state.settings.max_body_bytes)
        elif name != "adapter_model.safetensors":
            artifact = parse_and_validate(data, base, limits)
            if artifact.task_id != task_id:
                manifest = dataclasses.replace(artifact.manifest, task_id=task_id)
                artifact = Artifact(manifest=manifest, tensors=artifact.tensors)
            return artifact
    if set(PEFT_FILES) <= set(files):
        return import_peft_files(files, task_id, base, limits)
    raise BadRequest(
        "upload one softserve .safetensors artifact, or a PEFT adapter: adapter_config.json + "
        f"adapter_model.safetensors (as two files or one zip); got {sorted(files)}",
        field="file",
    )


def store_upload(state: ServerState, task_id: str, files: dict[str, bytes]) -> TaskInfo:
    return store_artifact(state, parse_upload(state, task_id, files))


@router.put("/{task_id:taskpath}", status_code=201, dependencies=[AdminKey])
async def put_task(
    task_id: str,
    file: Annotated[list[UploadFile], File(description="artifact or PEFT adapter files")],
    state: StateDep,
) -> TaskResponse:
    """Upload a new version of a task. A rejected upload leaves the previous version serving."""
    validate_task_id(task_id)
    files: dict[str, bytes] = {}
    for upload in file:
        name = (upload.filename or "file").rsplit("/", 1)[-1]
        files[name] = await upload.read()
    info = await run_in_threadpool(store_upload, state, task_id, files)
    return _task_response(info)


def store_artifact(state: ServerState, artifact: Artifact) -> TaskInfo:
    version = state.store.put(artifact)
    # This replica switches at once; others follow through the store's watch().
    state.cache.apply(ChangeEvent(task_id=artifact.task_id, version=version, sha256=artifact.sha256))
    # acknowledged once servable: the new version's first request costs what a warm one does
    warm_task(state.cache, state.engine, artifact.task_id, wait_s=WARM_WAIT_S)
    state.metrics.uploads.labels(method=artifact.manifest.method).inc()
    return state.store.info(artifact.task_id)


def compress_and_store(state: ServerState, task_id: str, body: CompressRequest) -> TaskInfo:
    gists = state.store.get(body.gist_task)
    validate_artifact(gists, state.runner.fingerprint, state.limits)
    artifact = compress(state.runner, gists, body.instruction, task_id, keep=body.keep_instruction)
    return store_artifact(state, artifact)


@router.post("/{task_id:taskpath}/compress", status_code=201, dependencies=[AdminKey])
async def compress_task(task_id: str, body: CompressRequest, state: StateDep) -> TaskResponse:
    """Compress an instruction into a new version of `task_id` (method gist) with stored gist embeddings."""
    validate_task_id(task_id)
    validate_task_id(body.gist_task)  # the schema's pattern alone lets '..' through
    return _task_response(await run_in_threadpool(compress_and_store, state, task_id, body))


@router.get("", dependencies=[ApiKey])
def list_tasks(state: StateDep) -> TaskList:
    return TaskList(tasks=[_task_response(i) for i in state.store.list()])


@router.get("/{task_id:taskpath}", dependencies=[ApiKey])
def get_task(task_id: str, state: StateDep) -> TaskResponse:
    return _task_response(state.store.info(validate_task_id(task_id)))


@router.delete("/{task_id:taskpath}", status_code=204, dependencies=[AdminKey])
def delete_task(task_id: str, state: StateDep) -> Response:
    state.store.delete(validate_task_id(task_id))
    state.cache.apply(ChangeEvent(task_id=task_id, version=0))
    return Response(status_code=204)
