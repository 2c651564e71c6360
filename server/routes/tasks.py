"""Task management routes: upload (artifact or PEFT adapter), compress, list, inspect, delete.

The routes validate the path, run server/task_service.py in a worker thread and shape the response; what an
upload is checked for, and the pruning after it, is described there.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Response, UploadFile
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor

from prompt_store import validate_task_id
from prompt_store.backends import TaskInfo
from prompt_store.task_id import validate_new_task_id
from server import task_service
from server.deps import AdminKey, ApiKey, StateDep
from server.schemas import ERROR_RESPONSES, CompressRequest, InputFormatOut, TaskList, TaskResponse


class TaskPathConvertor(Convertor[str]):
    """Like starlette's `path`, but newlines too: with `.*` a trailing `%0A` would be cut off (and `$`
    matches before it), so `/tasks/x%0A` acted on task `x`. Everything sent reaches validate_task_id."""

    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("taskpath", TaskPathConvertor())

router = APIRouter(prefix="/tasks", tags=["tasks"], responses=ERROR_RESPONSES)


def task_response(info: TaskInfo) -> TaskResponse:
    return TaskResponse(
        task_id=info.task_id,
        version=info.version,
        method=info.method,
        sha256=info.sha256,
        created_at=info.created_at,
        versions=list(info.versions),
        input_format=InputFormatOut(**info.input_format.to_dict()),
    )


@router.put("/{task_id:taskpath}", status_code=201, dependencies=[AdminKey])
async def put_task(
    task_id: str,
    file: Annotated[list[UploadFile], File(description="artifact or PEFT adapter files")],
    state: StateDep,
) -> TaskResponse:
    """Upload a new version of a task. A rejected upload changes nothing: the previous version serves on."""
    validate_new_task_id(task_id)
    files = [(upload.filename or "file", await upload.read()) for upload in file]
    info = await run_in_threadpool(task_service.store_upload, state, task_id, files)
    return task_response(info)


@router.post("/{task_id:taskpath}/compress", status_code=201, dependencies=[AdminKey])
async def compress_task(task_id: str, body: CompressRequest, state: StateDep) -> TaskResponse:
    """Compress an instruction into a new version of `task_id` (method gist) with stored gist embeddings
    (`gist_task`) or a trained compressor (`compressor`)."""
    validate_new_task_id(task_id)
    for named in (body.gist_task, body.compressor):
        if named is not None:
            validate_task_id(named)  # the schema's pattern alone lets '..' through
    return task_response(await run_in_threadpool(task_service.compress_and_store, state, task_id, body))


@router.get("", dependencies=[ApiKey])
def list_tasks(state: StateDep) -> TaskList:
    return TaskList(tasks=[task_response(i) for i in state.store.list()])


@router.get("/{task_id:taskpath}", dependencies=[ApiKey])
def get_task(task_id: str, state: StateDep) -> TaskResponse:
    return task_response(state.store.info(validate_task_id(task_id)))


@router.delete("/{task_id:taskpath}", status_code=204, dependencies=[AdminKey])
async def delete_task(task_id: str, state: StateDep) -> Response:
    """Delete every version of a task."""
    validate_task_id(task_id)
    await run_in_threadpool(task_service.delete_task, state, task_id)
    return Response(status_code=204)
