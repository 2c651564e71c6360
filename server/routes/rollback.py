"""Roll a task back to an older version: `POST /tasks/{task_id}/rollback {"version": N}`.

A rollback is a new version with the old content: version N's stored artifact is put again (validated for
this model, made current, warmed, old versions pruned, exactly like an upload), so the version history
only grows and every replica follows through the store's watch(). Versions pruned by
SOFTSERVE_KEEP_VERSIONS can no longer be rolled back to.

Without `version`, the content before the current one: the newest version older than the first version
that holds the current content (sha256), whose content differs. So `1=A 2=B 3=C` rolls back to B (as 4),
then to A (as 5), then refuses: a second rollback goes further back instead of undoing the first.
The work is server/task_service.py's roll_back.
"""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from prompt_store import validate_task_id
from server.deps import AdminKey, StateDep
from server.routes.tasks import task_response
from server.schemas import ERROR_RESPONSES, TaskResponse
from server.task_service import roll_back

MAX_VERSION = 2**31 - 1

router = APIRouter(prefix="/tasks", tags=["tasks"], responses=ERROR_RESPONSES)


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int | None = Field(
        None, ge=1, le=MAX_VERSION, description="the version to restore (default: the content before)"
    )


class RollbackResponse(TaskResponse):
    restored_version: int = Field(description="the version whose content the new version holds")


@router.post("/{task_id:taskpath}/rollback", status_code=201, dependencies=[AdminKey])
async def rollback_task(
    task_id: str, state: StateDep, body: RollbackRequest | None = None
) -> RollbackResponse:
    """Make an older version's content current again, as a new version (the response names both)."""
    validate_task_id(task_id)
    requested = body.version if body is not None else None
    info, restored = await run_in_threadpool(roll_back, state, task_id, requested)
    return RollbackResponse(**task_response(info).model_dump(), restored_version=restored)
