"""The fine-tuning worker: `python -m jobs.worker` (`softserve worker`), one process, the model loaded once.

It consumes the huey queue of the store (SQLite beside a disk store, or the store's Redis), trains each job
with the existing trainers (training.pipeline.train_task) on the model the shared runtime loads, and on
success puts the artifact into the store as a new version of the task: every server hot-swaps it through
its store watch, exactly as after an upload. A heartbeat thread refreshes the jobs it runs and fails other
workers' silent jobs (jobs.records.reap). Settings are the server's (SOFTSERVE_* variables).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from jobs import records
from jobs.backend import JobBackend, default_work_dir, ensure_dir, open_backend
from jobs.data import BadFile, Example, parse_jsonl
from jobs.queue import make_huey, register
from prompt_store import Limits, NotFound, StoreError
from prompt_store.backends import open_store
from server.settings import Settings
from training.data import Record
from training.loop import TrainConfig
from training.model import LoadedModel
from training.pipeline import DataSplit, TaskRun, TaskRunConfig, train_task

log = logging.getLogger("softserve.worker")

BASE_LR = 3e-2  # the recipes' learning rate (softserve-train's default); learning_rate_multiplier scales it
DEFAULT_EPOCHS = 10
DEFAULT_BATCH = 8
PUBLISH_POLL_S = 0.2


class Stop(Exception):
    """The job must stop: cancelled (`cancelled`) or no longer this worker's (reaped, failed)."""

    def __init__(self, cancelled: bool) -> None:
        super().__init__("cancelled" if cancelled else "no longer running")
        self.cancelled = cancelled


class FileProblem(Exception):
    """A job's file is gone or unreadable: the job fails with this message, `field` naming the file."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def load_lm(settings: Settings) -> LoadedModel:
    """The served base model through the shared runtime: the same loading, hence the same fingerprint."""
    from training.model import load_model

    return load_model(settings.model, dtype=settings.dtype, device=settings.device)


def to_records(examples: list[Example], method: str) -> list[Record]:
    """Only gist training reads the instruction (the system turn); the other methods learn input -> output."""
    return [Record(e.input, e.output, e.instruction if method == "gist" else "") for e in examples]


def run_config(job: dict[str, Any], n_train: int, out_dir: Path) -> TaskRunConfig:
    method = job["method"]["type"]
    hp = job["hyperparameters"]
    batch = int(hp.get("batch_size") or min(DEFAULT_BATCH, n_train))
    steps = int(
        hp.get("steps") or max(1, math.ceil(float(hp.get("n_epochs") or DEFAULT_EPOCHS) * n_train / batch))
    )
    cfg = TrainConfig(
        steps=steps,
        batch_size=batch,
        lr=BASE_LR * float(hp.get("learning_rate_multiplier") or 1.0),
        warmup_steps=int(hp.get("warmup_steps", min(10, steps // 10))),
        seed=int(job["seed"]),
        checkpoint_every=max(1, steps // 4),
        progress=False,
    )
    options = {k: hp[k] for k in records.METHOD_HYPERPARAMETERS if k in hp}
    return TaskRunConfig(
        method_name=method,
        task_id=job["suffix"],
        train_cfg=cfg,
        method_options={**options, "seed": int(job["seed"])},
        out_dir=out_dir,
        run_eval=bool(job.get("validation_file")),
    )


class Worker:
    def __init__(self, settings: Settings, lm: LoadedModel | None = None) -> None:
        self.settings = settings
        self.backend: JobBackend = open_backend(settings.store)
        limits = Limits(
            max_virtual_tokens=settings.max_virtual_tokens, max_file_bytes=settings.max_body_bytes
        )
        self.store = open_store(settings.store, limits=limits)
        self.huey = make_huey(settings.store)
        register(self.huey, self.run)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.work_dir = ensure_dir(settings.job_work_dir or default_work_dir(settings.store))
        self.lm = lm or load_lm(settings)
        self.active: set[str] = set()
        self.stopping = threading.Event()
        self.beat_s = max(0.1, min(5.0, settings.job_heartbeat_timeout_s / 4))

    # ---- heartbeat + reaper --------------------------------------------------------------------------
    def heartbeat_loop(self) -> None:
        while not self.stopping.wait(self.beat_s):
            try:
                for job_id in list(self.active):
                    records.heartbeat(self.backend, job_id)
                records.reap(self.backend, self.settings.job_heartbeat_timeout_s)
            except Exception:  # noqa: BLE001 - a store hiccup must not end the heartbeat
                log.exception("heartbeat failed")

    def check(self, job_id: str, **progress: Any) -> None:
        """Between steps: refresh the heartbeat and progress; raise Stop when cancelled or taken away."""
        job = records.heartbeat(self.backend, job_id, **progress)
        if job["status"] != "running":
            raise Stop(cancelled=False)
        if job.get("cancel_requested"):
            raise Stop(cancelled=True)

    # ---- one job -------------------------------------------------------------------------------------
    def run(self, job_id: str) -> None:
        try:
            job = self.backend.get_job(job_id)
        except NotFound:
            log.warning("job %s: no record, skipped", job_id)
            return
        if not records.transition(
            self.backend, job_id, {"queued"}, "running", heartbeat_at=records.now(), worker=self.name
        ):
            log.info("job %s is %s, not queued: skipped", job_id, self.backend.get_job(job_id)["status"])
            return
        self.active.add(job_id)
        records.add_event(self.backend, job_id, f"started on worker {self.name}")
        try:
            self.train(job)
        except Stop as stop:
            if stop.cancelled and records.transition(self.backend, job_id, {"running"}, "cancelled"):
                records.add_event(self.backend, job_id, "cancelled")
            log.info("job %s stopped: %s", job_id, stop)
        except FileProblem as exc:
            records.fail(self.backend, job_id, str(exc), "invalid_file", exc.field)
        except Exception as exc:  # noqa: BLE001 - any failure ends the job with its message
            log.exception("job %s failed", job_id)
            records.fail(self.backend, job_id, f"{type(exc).__name__}: {exc}", "training_error")
        finally:
            self.active.discard(job_id)

    def read_file(self, job: dict[str, Any], field: str) -> list[Example]:
        file_id = job[field]
        try:
            data = self.backend.file_bytes(file_id)
        except NotFound:
            raise FileProblem(
                f"{field} {file_id!r} was deleted before the job could read it", field
            ) from None
        try:
            return parse_jsonl(data, self.settings.file_max_lines)
        except BadFile as exc:
            raise FileProblem(f"{field} {file_id!r}: {exc}", field) from None

    def train(self, job: dict[str, Any]) -> None:
        job_id, method = job["id"], job["method"]["type"]
        train_examples = to_records(self.read_file(job, "training_file"), method)
        valid = to_records(self.read_file(job, "validation_file"), method) if job["validation_file"] else []
        out_dir = self.work_dir / job_id
        cfg = run_config(job, len(train_examples), out_dir)
        total, t0 = cfg.train_cfg.steps, time.monotonic()
        every = max(1, total // 100)
        records.add_event(
            self.backend, job_id, f"training {method} for {total} steps on {len(train_examples)} examples"
        )

        def on_step(step: int, loss: float) -> None:
            eta = (time.monotonic() - t0) / step * (total - step)
            progress = {"step": step, "total_steps": total, "loss": loss, "eta_seconds": round(eta, 1)}
            self.check(job_id, progress=progress, estimated_finish=int(records.now() + eta))
            if step % every == 0 or step == total:
                data = {"step": step, "total_steps": total, "train_loss": loss}
                records.add_event(
                    self.backend, job_id, f"step {step}/{total}: training loss={loss:.4f}", data=data
                )

        self.check(job_id, progress={"step": 0, "total_steps": total, "loss": None, "eta_seconds": None})
        run = train_task(self.lm, DataSplit(train_examples, valid), _with(cfg, on_step=on_step))
        for name, result in run.evaluation.items():  # validation_file: exact match and ROUGE-L per variant
            metrics = {
                "step": total,
                "exact_match": result.exact_match,
                "rouge_l": result.rouge_l,
                "n": result.n,
            }
            message = f"eval {name}: exact_match={result.exact_match:.3f} rouge_l={result.rouge_l:.3f}"
            records.add_event(self.backend, job_id, message, data=metrics)
        self.publish(job, run, out_dir)

    def publish(self, job: dict[str, Any], run: TaskRun, out_dir: Path) -> None:
        """After every earlier job for the same task has ended, put the artifact as the task's new version."""
        job_id = job["id"]
        waited = False
        while earlier := records.earlier_active(self.backend, self.backend.get_job(job_id)):
            if not waited:
                ids = ", ".join(j["id"] for j in earlier)
                records.add_event(
                    self.backend, job_id, f"waiting for earlier jobs of {job['suffix']!r}: {ids}"
                )
                waited = True
            self.check(job_id)
            time.sleep(PUBLISH_POLL_S)
        self.check(job_id)  # cancelled or reaped while training: nothing is published
        try:
            version = self.store.put(run.artifact)
        except StoreError as exc:
            raise RuntimeError(f"the store refused the artifact: {exc}") from exc
        result_files = []
        if (out_dir / "loss.png").is_file():
            meta = new_result_file(job_id, "loss.png", (out_dir / "loss.png").stat().st_size)
            self.backend.put_file(meta, (out_dir / "loss.png").read_bytes())
            result_files.append(meta["id"])
        losses = run.result.losses
        checkpoint = {
            "object": "fine_tuning.job.checkpoint",
            "id": f"ftckpt-{job_id.removeprefix('ftjob-')}",
            "created_at": int(records.now()),
            "fine_tuned_model_checkpoint": f"{job['suffix']}@{version}",
            "fine_tuning_job_id": job_id,
            "step_number": len(losses),
            "metrics": {"step": len(losses), "train_loss": losses[-1] if losses else None},
        }
        moved = records.transition(
            self.backend,
            job_id,
            {"running"},
            "succeeded",
            fine_tuned_model=job["suffix"],
            version=version,
            result_files=result_files,
            checkpoints=[checkpoint],
        )
        records.add_event(self.backend, job_id, f"published {job['suffix']!r} version {version}")
        if not moved:
            log.warning("job %s ended while publishing; version %d is stored", job_id, version)

    # ---- the process -----------------------------------------------------------------------------------
    def serve(self, concurrency: int) -> None:
        beat = threading.Thread(target=self.heartbeat_loop, name="job-heartbeat", daemon=True)
        beat.start()
        consumer = self.huey.create_consumer(
            workers=concurrency, worker_type="thread", periodic=False, initial_delay=0.05, max_delay=0.5
        )
        log.info("worker %s ready: %d job(s) at once, store %s", self.name, concurrency, self.store)
        try:
            consumer.run()
        finally:
            self.stopping.set()
            running = list(self.active)
            for job_id in running:
                message = f"the worker {self.name} was stopped mid-job"
                records.fail(self.backend, job_id, message, "worker_stopped")
            if running:  # a training thread is mid-step: leave without tearing it down under torch
                logging.shutdown()
                os._exit(0)


def new_result_file(job_id: str, filename: str, size: int) -> dict[str, Any]:
    return {
        "id": f"file-{job_id.removeprefix('ftjob-')}-loss",
        "object": "file",
        "bytes": size,
        "created_at": int(records.now()),
        "filename": filename,
        "purpose": "fine-tune-results",
        "status": "processed",
    }


def _with(cfg: TaskRunConfig, **changes: Any) -> TaskRunConfig:
    import dataclasses

    return dataclasses.replace(cfg, **changes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="softserve worker", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--concurrency", type=int, default=None, help="jobs at once (SOFTSERVE_WORKER_CONCURRENCY)"
    )
    parser.add_argument("--store", default=None, help="disk:PATH or redis://... (SOFTSERVE_STORE)")
    parser.add_argument("--model", default=None, help="the served model (SOFTSERVE_MODEL)")
    args = parser.parse_args(argv)
    for key in ("store", "model"):
        if getattr(args, key) is not None:
            os.environ[f"SOFTSERVE_{key.upper()}"] = getattr(args, key)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = Settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("huey").setLevel(logging.WARNING)
    Worker(settings).serve(args.concurrency or settings.worker_concurrency)
    return 0


if __name__ == "__main__":
    sys.exit(main())
