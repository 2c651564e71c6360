"""Task management: upload (artifact or PEFT adapter), list, inspect, delete.

An upload is validated for this model (shape, fit, context, fingerprint) before the store takes it; the
store then checks the bytes in their stored form. After a new version is current, old versions beyond
SOFTSERVE_KEEP_VERSIONS are pruned, except those a running request here still holds.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, File, Response, UploadFile
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor

from prompt_store import Artifact, StoreError, check_servable, validate_artifact, validate_task_id
from prompt_store.backends import ChangeEvent, TaskInfo
from prompt_store.task_id import validate_new_task_id
from server.deps import AdminKey, ApiKey, StateDep
from server.gist import compress
from server.schemas import ERROR_RESPONSES, CompressRequest, TaskList, TaskResponse
from server.state import ServerState
from server.uploads import Files, parse_upload
from server.warmup import warm_task

log = logging.getLogger("softserve.tasks")


class TaskPathConvertor(Convertor[str]):
    """Like starlette's `path`, but newlines too: with `.*` a trailing `%0A` would be cut off (and `$`
    matches before it), so `/tasks/x%0A` acted on task `x`. Everything sent reaches validate_task_id."""

    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("taskpath", TaskPathConvertor())

SHA_SHOWN = 12  # sha256 characters in log lines
WARM_WAIT_S = 5.0  # an upload waits at most this long for the engine to build the new prefix

router = APIRouter(prefix="/tasks", tags=["tasks"], responses=ERROR_RESPONSES)


def _task_response(info: TaskInfo) -> TaskResponse:
    return TaskResponse(
        task_id=info.task_id,
        version=info.version,
        method=info.method,
        sha256=info.sha256,
        created_at=info.created_at,
        versions=list(info.versions),
    )


def store_upload(state: ServerState, task_id: str, files: Files) -> TaskInfo:
    max_bytes = state.settings.max_body_bytes
    artifact = parse_upload(files, task_id, state.runner.fingerprint, state.limits, max_bytes)
    return store_artifact(state, artifact)


@router.put("/{task_id:taskpath}", status_code=201, dependencies=[AdminKey])
async def put_task(
    task_id: str,
    file: Annotated[list[UploadFile], File(description="artifact or PEFT adapter files")],
    state: StateDep,
) -> TaskResponse:
    """Upload a new version of a task. A rejected upload changes nothing: the previous version serves on."""
    validate_new_task_id(task_id)
    files = [(upload.filename or "file", await upload.read()) for upload in file]
    info = await run_in_threadpool(store_upload, state, task_id, files)
    return _task_response(info)


def store_artifact(state: ServerState, artifact: Artifact, action: str = "upload") -> TaskInfo:
    """Store a new version (refused first if this model could never serve it), switch to it, prune."""
    check_servable(artifact, state.runner.fingerprint, state.runner.max_context)
    version = state.store.put(artifact)
    m = artifact.manifest  # what was stored, never any prompt or instruction text
    log.info(
        "%s: task=%s version=%d method=%s bytes=%d sha256=%s",
        action,
        artifact.task_id,
        version,
        m.method,
        artifact.nbytes(),
        m.sha256[:SHA_SHOWN],
    )
    # This replica switches at once; others follow through the store's watch().
    state.cache.apply(ChangeEvent(task_id=artifact.task_id, version=version, sha256=artifact.sha256))
    # acknowledged once servable: the new version's first request costs what a warm one does
    warm_task(state.cache, state.engine, artifact.task_id, wait_s=WARM_WAIT_S)
    state.metrics.uploads.labels(method=artifact.manifest.method).inc()
    prune(state, artifact.task_id)
    return stored_info(state, artifact, version)


def prune(state: ServerState, task_id: str) -> None:
    """Keep SOFTSERVE_KEEP_VERSIONS versions plus those a running request here holds (a failure only logs:
    the upload itself succeeded)."""
    try:
        state.store.prune(task_id, state.settings.keep_versions, state.cache.pinned_versions(task_id))
    except StoreError as exc:
        log.warning("pruning old versions of %r failed: %s", task_id, exc)


def stored_info(state: ServerState, artifact: Artifact, version: int) -> TaskInfo:
    """What this put stored (not whatever is current by now: another put or a DELETE may have followed),
    with the versions the task holds now (empty when a DELETE came right after this put)."""
    try:
        versions = state.store.info(artifact.task_id).versions
    except StoreError:
        versions = ()
    m = artifact.manifest
    return TaskInfo(artifact.task_id, version, m.method, m.sha256, m.created_at, versions)


def compress_and_store(state: ServerState, task_id: str, body: CompressRequest) -> TaskInfo:
    gists = state.store.get(body.gist_task)
    validate_artifact(gists, state.runner.fingerprint, state.limits)
    artifact = compress(state.runner, gists, body.instruction, task_id, keep=body.keep_instruction)
    return store_artifact(state, artifact, action="compress")


@router.post("/{task_id:taskpath}/compress", status_code=201, dependencies=[AdminKey])
async def compress_task(task_id: str, body: CompressRequest, state: StateDep) -> TaskResponse:
    """Compress an instruction into a new version of `task_id` (method gist) with stored gist embeddings."""
    validate_new_task_id(task_id)
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
    validate_task_id(task_id)
    try:
        current: TaskInfo | None = state.store.info(task_id)  # for the log line only
    except StoreError:
        current = None
    state.store.delete(task_id)
    version, method, sha = (current.version, current.method, current.sha256) if current else (0, "?", "")
    log.info(
        "delete: task=%s version=%d method=%s sha256=%s (every version)",
        task_id,
        version,
        method,
        sha[:SHA_SHOWN],
    )
    state.cache.apply(ChangeEvent(task_id=task_id, version=0))
    state.metrics.forget_task(task_id)  # its metric series go with it
    return Response(status_code=204)
