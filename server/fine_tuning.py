"""The server's side of fine-tuning: files and job records in the store's backend, the queue, and (embedded
default) one supervised local worker process.

The server never trains: it stores and validates files, creates job records, enqueues job ids and reads
job state. Training runs in `python -m jobs.worker`: with SOFTSERVE_EMBEDDED_WORKER (default on) this server
starts one when the first job is queued (the model is loaded once in it), restarts it if it dies, and stops
it on shutdown. With `softserve worker` processes elsewhere (Redis store), set SOFTSERVE_EMBEDDED_WORKER=0.
A reaper thread here fails running jobs whose worker stopped heartbeating (jobs.records.reap), whichever
worker that was.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

from jobs import records
from jobs.backend import JobBackend, open_backend
from jobs.data import BadFile, parse_jsonl
from jobs.queue import JobQueue
from prompt_store import NotFound
from server.settings import Settings

log = logging.getLogger("softserve.fine_tuning")

SUPERVISE_S = 0.5  # how often the reaper and the supervisor look
RESTART_DELAY_S = 1.0  # between a worker's exit and its restart
STOP_WAIT_S = 10.0  # a stopping worker gets this long after SIGTERM before SIGKILL


def worker_env(settings: Settings) -> dict[str, str]:
    """The worker reads the same settings: those this server was given in code travel as variables."""
    env = dict(os.environ)
    values: dict[str, Any] = {
        "MODEL": settings.model,
        "STORE": settings.store,
        "DTYPE": settings.dtype,
        "DEVICE": settings.device,
        "JOB_HEARTBEAT_TIMEOUT_S": settings.job_heartbeat_timeout_s,
        "JOB_WORK_DIR": settings.job_work_dir,
        "WORKER_CONCURRENCY": settings.worker_concurrency,
        "FILE_MAX_LINES": settings.file_max_lines,
        "MAX_VIRTUAL_TOKENS": settings.max_virtual_tokens,
        "LOG_LEVEL": settings.log_level,
    }
    for key, value in values.items():
        if value is not None:
            env[f"SOFTSERVE_{key}"] = str(value)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


class WorkerProcess:
    """One local `python -m jobs.worker`, started on demand, restarted when it dies, stopped with us."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0
        self.last_exit = 0.0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def ensure(self, wanted: bool) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            log.warning("fine-tuning worker (pid %d) exited with %s", self.proc.pid, self.proc.returncode)
            self.proc, self.last_exit = None, time.monotonic()
        if (
            self.proc is None
            and (wanted or self.started)
            and time.monotonic() - self.last_exit > RESTART_DELAY_S
        ):
            cmd = [sys.executable, "-m", "jobs.worker"]
            self.proc = subprocess.Popen(cmd, env=worker_env(self.settings))  # noqa: S603 - our own module
            self.started += 1
            log.info("fine-tuning worker started (pid %d)", self.proc.pid)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_WAIT_S)


class FineTuning:
    """Files, jobs, queue and supervisor of one server."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.backend: JobBackend = open_backend(settings.store)
        self._queue: JobQueue | None = None
        self.worker = WorkerProcess(settings) if settings.embedded_worker else None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="fine-tuning", daemon=True)

    @property
    def queue(self) -> JobQueue:
        if self._queue is None:
            self._queue = JobQueue(self.settings.store)
        return self._queue

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(5)
        if self.worker is not None:
            self.worker.stop()
        self.backend.close()

    def _supervise(self) -> None:
        problem = ""
        while not self._stop.is_set():
            try:
                records.reap(self.backend, self.settings.job_heartbeat_timeout_s)
                if self.worker is not None:
                    waiting = any(j["status"] in records.WAITING for j in self.backend.list_jobs())
                    self.worker.ensure(wanted=waiting)
                problem = ""
            except Exception as exc:  # noqa: BLE001 - an unreachable store must not end supervision
                if str(exc) != problem:  # once per distinct failure, not every half second
                    log.warning("fine-tuning supervision failed: %s", exc)
                problem = str(exc)
            self._wake.wait(SUPERVISE_S)
            self._wake.clear()

    # ---- files ---------------------------------------------------------------------------------------
    def add_file(self, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
        """Validate every line (BadFile names the first bad one), then store bytes + metadata."""
        examples = parse_jsonl(data, self.settings.file_max_lines)
        meta = {
            "id": f"file-{uuid.uuid4().hex[:24]}",
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "lines": len(examples),
        }
        self.backend.put_file(meta, data)
        return meta

    # ---- jobs ----------------------------------------------------------------------------------------
    def create_job(self, **fields: Any) -> dict[str, Any]:
        """validating_files -> queued (checked again here: a file deleted since) -> enqueued."""
        waiting = sum(1 for j in self.backend.list_jobs() if j["status"] in records.WAITING)
        if waiting >= self.settings.max_queued_jobs:
            from server.errors import Overloaded

            raise Overloaded(
                f"{waiting} fine-tuning jobs are waiting "
                f"(SOFTSERVE_MAX_QUEUED_JOBS={self.settings.max_queued_jobs}); retry later",
                retry_after=30,
            )
        job = self.backend.create_job(records.new_job(**fields))
        records.add_event(self.backend, job["id"], f"validating {job['training_file']}")
        try:
            for field in ("training_file", "validation_file"):
                if job[field]:
                    parse_jsonl(self.backend.file_bytes(job[field]), self.settings.file_max_lines)
        except (NotFound, BadFile) as exc:  # the job records why it failed
            reason = str(exc) if isinstance(exc, BadFile) else f"{job[field]} was deleted"
            records.fail(self.backend, job["id"], f"{field}: {reason}", "invalid_file", field)
            return self.backend.get_job(job["id"])
        records.transition(self.backend, job["id"], {"validating_files"}, "queued")
        records.add_event(self.backend, job["id"], "queued")
        self.queue.enqueue(job["id"])
        self._wake.set()
        return self.backend.get_job(job["id"])
