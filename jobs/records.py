"""Job records: creation, the status lifecycle, events, cancel and the heartbeat reaper.

    validating_files -> queued -> running -> succeeded | failed | cancelled

Every change is a compare-and-set through JobBackend.update_job, so a server's cancel, a worker's progress
and another worker's reaper never overwrite each other. A running job carries `heartbeat_at`; one whose
worker has been silent for the timeout is failed by whoever looks first (reap()), and its worker, should
it still be alive, stops at its next step and never publishes.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from jobs.backend import JobBackend, Record
from prompt_store.methods.options import TRAINING_OPTIONS

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
WAITING = frozenset({"validating_files", "queued"})
METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning", "accept", "gist")
DEFAULT_METHOD = "prompt_tuning"  # what OpenAI's `supervised` means here
# hyperparameters a job takes: the loop's (OpenAI's names) and the methods' options (training.cli's)
LOOP_HYPERPARAMETERS = ("n_epochs", "learning_rate_multiplier", "batch_size", "steps", "warmup_steps")
METHOD_HYPERPARAMETERS = TRAINING_OPTIONS  # the artifact contract's one list (prompt_store.methods)
INTERNAL = ("heartbeat_at", "cancel_requested", "worker", "seq", "checkpoints")  # not in the job object


def now() -> float:
    return time.time()


def new_job(
    *,
    model: str,
    suffix: str,
    training_file: str,
    validation_file: str | None,
    method: str,
    hyperparameters: dict[str, Any],
    seed: int,
) -> Record:
    return {
        "id": f"ftjob-{uuid.uuid4().hex[:24]}",
        "object": "fine_tuning.job",
        "created_at": int(now()),
        "model": model,
        "suffix": suffix,
        "training_file": training_file,
        "validation_file": validation_file,
        "method": {"type": method, method: {"hyperparameters": hyperparameters}},
        "hyperparameters": hyperparameters,
        "status": "validating_files",
        "error": None,
        "fine_tuned_model": None,
        "version": None,
        "finished_at": None,
        "result_files": [],
        "trained_tokens": None,
        "seed": seed,
        "organization_id": "softserve",
        "estimated_finish": None,
        "integrations": [],
        "metadata": None,
        "progress": {"step": 0, "total_steps": None, "loss": None, "eta_seconds": None},
        "heartbeat_at": None,
        "worker": None,
        "cancel_requested": False,
    }


def public(job: Record) -> Record:
    """The job as the API shows it (OpenAI's fine_tuning.job plus softserve's progress and version)."""
    return {k: v for k, v in job.items() if k not in INTERNAL}


def add_event(
    backend: JobBackend, job_id: str, message: str, level: str = "info", data: Record | None = None
) -> None:
    backend.add_event(
        job_id,
        {
            "object": "fine_tuning.job.event",
            "id": f"ftevent-{uuid.uuid4().hex[:24]}",
            "created_at": int(now()),
            "level": level,
            "message": message,
            "data": data or {},
            "type": "metrics" if data and "step" in data else "message",
        },
    )


def transition(
    backend: JobBackend, job_id: str, frm: frozenset[str] | set[str], to: str, **fields: Any
) -> bool:
    """Move the job to `to` (setting `fields`) only if its status is in `frm`; whether it moved."""
    moved = False

    def update(job: Record) -> Record | None:
        nonlocal moved
        if job["status"] not in frm:
            return None
        moved = True
        job.update(fields, status=to)
        if to in TERMINAL:
            job["finished_at"] = int(now())
            job["progress"] = {**job["progress"], "eta_seconds": None}
        return job

    backend.update_job(job_id, update)
    return moved


def fail(backend: JobBackend, job_id: str, message: str, code: str, param: str | None = None) -> bool:
    """Fail a job that has not ended yet (its message becomes the job's `error` and an event)."""
    active = {"validating_files", "queued", "running"}
    error = {"code": code, "message": message, "param": param}
    if transition(backend, job_id, active, "failed", error=error):
        add_event(backend, job_id, f"failed: {message}", level="error")
        return True
    return False


def request_cancel(backend: JobBackend, job_id: str) -> Record:
    """A waiting job is cancelled at once; a running one is flagged, and its worker stops at the next step."""
    if transition(backend, job_id, WAITING, "cancelled"):
        add_event(backend, job_id, "cancelled before it started")
    else:

        def flag(job: Record) -> Record | None:
            return {**job, "cancel_requested": True} if job["status"] == "running" else None

        if backend.update_job(job_id, flag)["status"] == "running":
            add_event(backend, job_id, "cancel requested; stopping at the next training step")
    return backend.get_job(job_id)


def heartbeat(backend: JobBackend, job_id: str, **fields: Any) -> Record:
    """Refresh a running job's heartbeat (and progress fields); returns the record as it is now."""

    def beat(job: Record) -> Record | None:
        if job["status"] != "running":
            return None
        return {**job, **fields, "heartbeat_at": now()}

    return backend.update_job(job_id, beat)


def reap(backend: JobBackend, timeout_s: float) -> list[str]:
    """Fail every running job whose worker has been silent for `timeout_s`; the ids failed."""
    failed = []
    cutoff = now() - timeout_s
    for job in backend.list_jobs():
        if job["status"] != "running" or (job.get("heartbeat_at") or 0) >= cutoff:
            continue
        worker = job.get("worker") or "?"
        message = (
            f"the worker ({worker}) stopped: no heartbeat for {timeout_s:g} s "
            "(killed or lost); nothing was published. Create the job again to retry."
        )

        error = {"code": "worker_lost", "message": message, "param": None}
        moved = False

        def stale(j: Record, error: Record = error) -> Record | None:  # checked again inside the CAS
            nonlocal moved
            if j["status"] != "running" or (j.get("heartbeat_at") or 0) >= cutoff:
                return None
            moved = True
            finished = {"finished_at": int(now()), "progress": {**j["progress"], "eta_seconds": None}}
            return {**j, "status": "failed", "error": error, **finished}

        backend.update_job(job["id"], stale)
        if moved:
            add_event(backend, job["id"], f"failed: {message}", level="error")
            failed.append(job["id"])
    return failed


def earlier_active(backend: JobBackend, job: Record) -> list[Record]:
    """Jobs for the same task created before `job` that have not ended: `job` publishes after them."""
    return [
        j
        for j in backend.list_jobs()
        if j["suffix"] == job["suffix"] and j["seq"] < job["seq"] and j["status"] not in TERMINAL
    ]
