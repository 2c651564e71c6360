"""Roll a task back to an older version: `POST /tasks/{task_id}/rollback {"version": N}`.

A rollback is a new version with the old content: version N's stored artifact is put again (validated for
this model, made current, warmed, old versions pruned, exactly like an upload), so the version history
only grows and every replica follows through the store's watch(). Versions pruned by
SOFTSERVE_KEEP_VERSIONS can no longer be rolled back to.

Without `version`, the content before the current one: the newest version older than the first version
that holds the current content (sha256), whose content differs. So `1=A 2=B 3=C` rolls back to B (as 4),
then to A (as 5), then refuses: a second rollback goes further back instead of undoing the first.
"""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from prompt_store import validate_task_id
from prompt_store.backends import Store, TaskInfo
from prompt_store.errors import NotFound
from server.deps import AdminKey, StateDep
from server.errors import BadRequest
from server.routes.tasks import _task_response, store_artifact
from server.schemas import ERROR_RESPONSES, TaskResponse
from server.state import ServerState

MAX_VERSION = 2**31 - 1

router = APIRouter(prefix="/tasks", tags=["tasks"], responses=ERROR_RESPONSES)


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int | None = Field(
        None, ge=1, le=MAX_VERSION, description="the version to restore (default: the content before)"
    )


class RollbackResponse(TaskResponse):
    restored_version: int = Field(description="the version whose content the new version holds")


def previous_content(store: Store, info: TaskInfo) -> int:
    """The default target (see the module docstring); BadRequest when there is none."""
    shas = {v: store.get(info.task_id, v).sha256 for v in info.versions if v != info.version}
    first = min([v for v, sha in shas.items() if sha == info.sha256], default=info.version)
    older = [v for v, sha in shas.items() if v < first and sha != info.sha256]
    if not older:
        raise BadRequest(
            f"task {info.task_id!r} holds no older content than its current version {info.version} "
            f"(versions held: {', '.join(str(v) for v in info.versions)})",
            field="version",
        )
    return max(older)


def target_version(store: Store, info: TaskInfo, requested: int | None) -> int:
    if requested is None:
        return previous_content(store, info)
    if requested == info.version:
        raise BadRequest(f"version {requested} of {info.task_id!r} is already current", field="version")
    if requested not in info.versions:
        held = ", ".join(str(v) for v in info.versions)
        raise NotFound(f"task {info.task_id!r} has no version {requested} (versions held: {held})")
    return requested


def roll_back(state: ServerState, task_id: str, requested: int | None) -> tuple[TaskInfo, int]:
    version = target_version(state.store, state.store.info(task_id), requested)
    artifact = state.store.get(task_id, version)
    return store_artifact(state, artifact, action=f"rollback to {version}"), version


@router.post("/{task_id:taskpath}/rollback", status_code=201, dependencies=[AdminKey])
async def rollback_task(
    task_id: str, state: StateDep, body: RollbackRequest | None = None
) -> RollbackResponse:
    """Make an older version's content current again, as a new version (the response names both)."""
    validate_task_id(task_id)
    requested = body.version if body is not None else None
    info, restored = await run_in_threadpool(roll_back, state, task_id, requested)
    return RollbackResponse(**_task_response(info).model_dump(), restored_version=restored)
