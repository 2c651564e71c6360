"""OpenAI's files and fine-tuning jobs API: /v1/files and /v1/fine_tuning/jobs (writes need the admin key).

A job trains a soft prompt for the served model (`model` must be it) and publishes it as a new version of
the task `suffix`: on success it is hot-swapped like any upload and listed in /v1/models. Training runs in a
worker process (server.fine_tuning), never here.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from jobs import records
from jobs.data import BadFile
from prompt_store import InvalidTaskId, NotFound
from prompt_store.embedded_model import DEFAULT_MODEL_NAME
from prompt_store.task_id import validate_new_task_id
from server.deps import AdminKey, ApiKey, StateDep
from server.errors import BadRequest, LimitExceeded
from server.fine_tuning import FineTuning
from server.routes.openai import ERRORS
from server.service import BASE_TASK

router = APIRouter(prefix="/v1", tags=["fine-tuning"], dependencies=[ApiKey], responses=ERRORS)
MAX_LIST = 100

Auto = Literal["auto"]
PosInt = Annotated[int, Field(ge=1, le=100_000)]


class Hyperparameters(BaseModel):
    """OpenAI's loop hyperparameters ("auto" = the recipes' default) and each method's own options."""

    model_config = ConfigDict(extra="forbid")
    n_epochs: Annotated[int, Field(ge=1, le=1000)] | Auto | None = None
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=100)] | Auto | None = None
    batch_size: Annotated[int, Field(ge=1, le=1024)] | Auto | None = None
    steps: PosInt | None = Field(None, description="optimizer steps (default: n_epochs over the file)")
    warmup_steps: Annotated[int, Field(ge=0, le=100_000)] | None = None
    num_virtual_tokens: Annotated[int, Field(ge=1, le=100_000)] | None = None
    init: Literal["random", "vocab", "text"] | None = None
    init_text: Annotated[str, Field(max_length=10_000)] | None = None
    encoder_type: Literal["mlp", "lstm"] | None = None
    encoder_hidden_size: PosInt | None = None
    projection: bool | None = None
    projection_hidden_size: PosInt | None = None
    num_subspaces: PosInt | None = None
    num_codewords: PosInt | None = None
    added_length: Annotated[int, Field(ge=0, le=100_000)] | None = None
    added_subspaces: PosInt | None = None
    added_codewords: PosInt | None = None
    weight_lr: Annotated[float, Field(gt=0, le=10)] | None = None
    codebook_lr: Annotated[float, Field(gt=0, le=10)] | None = None
    added_lr: Annotated[float, Field(gt=0, le=10)] | None = None
    num_gist_tokens: Annotated[int, Field(ge=1, le=1024)] | None = None


class MethodParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    """`type`: a softserve method (OpenAI's `supervised` = prompt_tuning); its block: hyperparameters."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "prompt_tuning", "p_tuning", "prefix_tuning", "accept", "gist"]
    supervised: MethodParams | None = None
    prompt_tuning: MethodParams | None = None
    p_tuning: MethodParams | None = None
    prefix_tuning: MethodParams | None = None
    accept: MethodParams | None = None
    gist: MethodParams | None = None


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(max_length=256, description="the served base model ('base' or its name)")
    training_file: str = Field(max_length=64)
    validation_file: str | None = Field(None, max_length=64)
    suffix: str | None = Field(None, max_length=64, description="the task id to publish (default ft-<hex>)")
    method: Method | None = None
    hyperparameters: Hyperparameters | None = Field(None, description="OpenAI's older form of method")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None


def fine_tuning(request: Request) -> FineTuning:
    ft: FineTuning = request.app.state.fine_tuning
    return ft


def page(items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    """OpenAI's cursor page: items after the one with id `after`, at most `limit`."""
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}


# ---- files ------------------------------------------------------------------------------------------------


@router.post("/files", dependencies=[AdminKey])
async def create_file(
    request: Request,
    file: Annotated[UploadFile, File(description="JSONL: chat `messages` or prompt/completion lines")],
    purpose: Annotated[str, Form(max_length=64)],
) -> dict[str, Any]:
    """Upload a training file; every line is validated (a refusal names the line)."""
    ft = fine_tuning(request)
    if purpose != "fine-tune":
        raise BadRequest(f"purpose {purpose[:64]!r} is not supported; use 'fine-tune'", field="purpose")
    limit = ft.settings.file_max_bytes
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise LimitExceeded(f"file: larger than {limit} bytes (SOFTSERVE_FILE_MAX_BYTES)", field="file")
    try:
        return await run_in_threadpool(ft.add_file, (file.filename or "file.jsonl")[:256], purpose, data)
    except BadFile as exc:
        raise BadRequest(f"file: {exc}", field="file") from None


@router.get("/files")
async def list_files(request: Request) -> dict[str, Any]:
    ft = fine_tuning(request)
    return {"object": "list", "data": await run_in_threadpool(ft.backend.list_files), "has_more": False}


@router.get("/files/{file_id}")
async def get_file(request: Request, file_id: str) -> dict[str, Any]:
    return await run_in_threadpool(fine_tuning(request).backend.file_meta, file_id)


@router.get("/files/{file_id}/content")
async def get_file_content(request: Request, file_id: str) -> Response:
    ft = fine_tuning(request)
    meta = await run_in_threadpool(ft.backend.file_meta, file_id)
    data = await run_in_threadpool(ft.backend.file_bytes, file_id)
    kind = "image/png" if meta["filename"].endswith(".png") else "application/jsonl"
    return Response(data, media_type=kind)


@router.delete("/files/{file_id}", dependencies=[AdminKey])
async def delete_file(request: Request, file_id: str) -> dict[str, Any]:
    await run_in_threadpool(fine_tuning(request).backend.delete_file, file_id)
    return {"id": file_id, "object": "file", "deleted": True}


# ---- jobs -------------------------------------------------------------------------------------------------


def job_fields(body: JobCreate, state: Any, ft: FineTuning) -> dict[str, Any]:
    """The checked fields of a new job; 4xx naming the field otherwise."""
    served = {BASE_TASK, state.runner.name} | (
        {DEFAULT_MODEL_NAME} if state.settings.model is None else set()
    )
    if body.model not in served:
        raise BadRequest(
            f"model {body.model[:64]!r} is not the served base model; use one of {sorted(served)}",
            field="model",
        )
    suffix = body.suffix or f"ft-{uuid.uuid4().hex[:12]}"
    try:
        validate_new_task_id(suffix)
    except InvalidTaskId as exc:
        raise BadRequest(f"suffix: {exc.message}", field="suffix") from None
    for field in ("training_file", "validation_file"):
        file_id = getattr(body, field)
        if file_id is None:
            continue
        try:
            meta = ft.backend.file_meta(file_id)
        except NotFound:
            raise BadRequest(f"{field}: no file {file_id!r}", field=field) from None
        if meta["purpose"] != "fine-tune":
            raise BadRequest(
                f"{field}: file {file_id!r} has purpose {meta['purpose']!r}, not 'fine-tune'", field=field
            )
    method = body.method.type if body.method else records.DEFAULT_METHOD
    method = records.DEFAULT_METHOD if method == "supervised" else method
    block = getattr(body.method, body.method.type) if body.method else None
    given = (block.hyperparameters if block else None) or body.hyperparameters or Hyperparameters()
    hp = {k: v for k, v in given.model_dump(exclude_none=True).items() if v != "auto"}
    m = hp.get("num_virtual_tokens")
    if m is not None and m > state.settings.max_virtual_tokens:
        raise LimitExceeded(
            f"num_virtual_tokens: {m} is over the limit {state.settings.max_virtual_tokens} "
            "(SOFTSERVE_MAX_VIRTUAL_TOKENS)",
            field="method.hyperparameters.num_virtual_tokens",
        )
    return {
        "model": body.model,
        "suffix": suffix,
        "training_file": body.training_file,
        "validation_file": body.validation_file,
        "method": method,
        "hyperparameters": hp,
        "seed": body.seed if body.seed is not None else 0,
    }


@router.post("/fine_tuning/jobs", dependencies=[AdminKey])
async def create_job(request: Request, body: JobCreate, state: StateDep) -> dict[str, Any]:
    """Validate, record and queue a job; a worker trains it and publishes `suffix` on success."""
    ft = fine_tuning(request)
    fields = await run_in_threadpool(job_fields, body, state, ft)
    return records.public(await run_in_threadpool(lambda: ft.create_job(**fields)))


@router.get("/fine_tuning/jobs")
async def list_jobs(
    request: Request, after: str | None = None, limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = 20
) -> dict[str, Any]:
    jobs = await run_in_threadpool(fine_tuning(request).backend.list_jobs)
    return page([records.public(j) for j in jobs], after, limit)


@router.get("/fine_tuning/jobs/{job_id}")
async def get_job(request: Request, job_id: str) -> dict[str, Any]:
    """The job, with softserve's `progress`: step, total_steps, loss and eta_seconds."""
    return records.public(await run_in_threadpool(fine_tuning(request).backend.get_job, job_id))


@router.post("/fine_tuning/jobs/{job_id}/cancel", dependencies=[AdminKey])
async def cancel_job(request: Request, job_id: str) -> dict[str, Any]:
    """A waiting job is cancelled at once; a running one stops at its next training step."""
    backend = fine_tuning(request).backend
    return records.public(await run_in_threadpool(records.request_cancel, backend, job_id))


@router.get("/fine_tuning/jobs/{job_id}/events")
async def list_events(
    request: Request,
    job_id: str,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = 20,
) -> dict[str, Any]:
    """Newest first: status changes, the training loss per logging step, eval metrics."""
    backend = fine_tuning(request).backend
    await run_in_threadpool(backend.get_job, job_id)
    events = await run_in_threadpool(backend.events, job_id)
    return page(events[::-1], after, limit)


@router.get("/fine_tuning/jobs/{job_id}/checkpoints")
async def list_checkpoints(
    request: Request,
    job_id: str,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = 10,
) -> dict[str, Any]:
    """The published result (`<task>@<version>`) with its step and final training loss."""
    job = await run_in_threadpool(fine_tuning(request).backend.get_job, job_id)
    return page(list(job.get("checkpoints") or [])[::-1], after, limit)
