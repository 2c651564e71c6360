"""Fine-tuning end to end with the official `openai` client: a real uvicorn server on the tiny model (saved to
a folder, so that the worker loads the same model) and its embedded default worker, a real subprocess the
server supervises. The kill -9 test runs last: it kills that worker and checks the server restarts it."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from ft_helpers import HEARTBEAT_TIMEOUT_S, chat_lines, method, wait_for
from live_server import save_tiny_model, threaded_server
from openai import OpenAI

from jobs.backend import DiskJobs
from prompt_store import NotFound
from runtime.model_runner import load_model
from server.cli import main as cli_main

ADMIN = "fine-tune-admin-key-0123456789"
LONG = 100_000  # steps: a job that only ends when cancelled or killed


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OpenAI, Any, DiskJobs]]:
    tmp = tmp_path_factory.mktemp("ft")
    model_dir = save_tiny_model(tmp / "model")
    runner = load_model(str(model_dir), dtype="float32", device="cpu")
    settings = {
        "model": str(model_dir),
        "device": "cpu",
        "dtype": "float32",
        "admin_key": ADMIN,
        "job_work_dir": str(tmp / "work"),
        "job_heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S,
    }
    with threaded_server(tmp, runner=runner, **settings) as (url, state):
        yield OpenAI(base_url=f"{url}/v1", api_key=ADMIN, max_retries=0), state, DiskJobs(tmp / "store")


def upload(client: OpenAI, data: bytes) -> str:
    return client.files.create(file=("train.jsonl", data), purpose="fine-tune").id


def finished(client: OpenAI, job_id: str, timeout: float = 120.0) -> Any:
    def probe() -> Any:
        job = client.fine_tuning.jobs.retrieve(job_id)
        return job if job.status in ("succeeded", "failed", "cancelled") else None

    return wait_for(probe, f"job {job_id} to end", timeout)


def at_step(client: OpenAI, job_id: str, step: int) -> dict[str, Any]:
    def probe() -> Any:
        job = client.fine_tuning.jobs.retrieve(job_id).to_dict()
        assert job["status"] in ("queued", "running"), job
        return job if job["status"] == "running" and job["progress"]["step"] >= step else None

    found: dict[str, Any] = wait_for(probe, f"job {job_id} at step {step}", 120)
    return found


def test_openai_client_trains_a_task_that_is_then_served(live: tuple[OpenAI, Any, DiskJobs]) -> None:
    client, state, _ = live
    file_id, valid_id = upload(client, chat_lines(8)), upload(client, chat_lines(2, prefix="v"))
    job = client.fine_tuning.jobs.create(
        model="base",
        training_file=file_id,
        validation_file=valid_id,
        suffix="upper",
        extra_body={"method": method(steps=6)},
    )
    assert job.status == "queued" and job.model == "base"
    done = finished(client, job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == "upper"
    info = done.to_dict()
    assert info["progress"]["step"] == info["progress"]["total_steps"] == 6 and info["version"] == 1
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    losses = [e.data["train_loss"] for e in events if "train_loss" in (e.data or {})]
    assert len(losses) == 6 and all(loss > 0 for loss in losses)
    evals = [e.data for e in events if e.message.startswith("eval ")]  # the validation file's metrics
    assert evals and all("exact_match" in d for d in evals), evals
    assert events[0].message == "published 'upper' version 1"
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints[0].fine_tuned_model_checkpoint == "upper@1" and checkpoints[0].step_number == 6
    # the loss curve is a result file
    png = client.files.content(done.result_files[0]).content
    assert png.startswith(b"\x89PNG")
    # hot-swapped: listed and served like an upload, by its fine_tuned_model name
    assert "upper" in [m.id for m in client.models.list().data]
    reply = client.chat.completions.create(
        model=done.fine_tuned_model, messages=[{"role": "user", "content": "w3"}], max_tokens=3
    )
    assert reply.system_fingerprint == "upper@1" and reply.usage is not None
    assert reply.usage.completion_tokens == 3
    assert state.store.info("upper").version == 1


def test_cancel_stops_within_one_step_and_a_deleted_file_fails_its_job(
    live: tuple[OpenAI, Any, DiskJobs],
) -> None:
    client, state, _ = live
    long_job = client.fine_tuning.jobs.create(
        model="base",
        training_file=upload(client, chat_lines(8)),
        suffix="never",
        extra_body={"method": method(LONG)},
    )
    running = at_step(client, long_job.id, 2)  # the one worker is busy with it: the next job waits
    progress = running["progress"]
    assert progress["total_steps"] == LONG and progress["loss"] > 0 and progress["eta_seconds"] > 0
    doomed_file = upload(client, chat_lines(4))
    doomed = client.fine_tuning.jobs.create(
        model="base", training_file=doomed_file, suffix="doomed", extra_body={"method": method(3)}
    )
    client.files.delete(doomed_file)
    assert client.fine_tuning.jobs.retrieve(doomed.id).status == "queued"  # one job at a time per worker
    client.fine_tuning.jobs.cancel(long_job.id)
    step_at_cancel = client.fine_tuning.jobs.retrieve(long_job.id).to_dict()["progress"]["step"]
    ended = finished(client, long_job.id, timeout=30)
    assert ended.status == "cancelled"
    assert ended.to_dict()["progress"]["step"] <= step_at_cancel + 1  # within one training step
    with pytest.raises(NotFound):
        state.store.info("never")  # nothing published
    failed = finished(client, doomed.id)
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.message == f"training_file {doomed_file!r} was deleted before the job could read it"
    assert failed.error.param == "training_file"


def test_softserve_jobs_cli_lists_shows_follows_and_cancels(
    live: tuple[OpenAI, Any, DiskJobs], capsys: pytest.CaptureFixture[str]
) -> None:
    client, _, _ = live
    flags = ["--url", str(client.base_url).removesuffix("/v1/"), "--key", ADMIN]
    job = client.fine_tuning.jobs.create(
        model="base",
        training_file=upload(client, chat_lines(4)),
        suffix="cli",
        extra_body={"method": method(3)},
    )
    assert cli_main(["jobs", "follow", job.id, *flags]) == 0
    out = capsys.readouterr().out
    assert "training prompt_tuning for 3 steps on 4 examples" in out and "published 'cli' version 1" in out
    assert f"{job.id}  succeeded  cli  3/3  loss " in out
    assert cli_main(["jobs", "list", *flags]) == 0 and f"{job.id}  succeeded" in capsys.readouterr().out
    long_job = client.fine_tuning.jobs.create(
        model="base",
        training_file=upload(client, chat_lines(4)),
        suffix="cli",
        extra_body={"method": method(LONG)},
    )
    at_step(client, long_job.id, 1)
    assert cli_main(["jobs", "show", long_job.id, *flags]) == 0
    assert f"{long_job.id}  running  cli  " in capsys.readouterr().out
    assert cli_main(["jobs", "cancel", long_job.id, *flags]) == 0
    assert cli_main(["jobs", "follow", long_job.id, *flags]) == 1  # it ended, but not in success
    assert f"job {long_job.id} cancelled" in capsys.readouterr().err


def test_kill9_of_the_embedded_worker_fails_the_job_and_the_server_restarts_it(
    live: tuple[OpenAI, Any, DiskJobs],
) -> None:
    client, state, jobs = live
    job = client.fine_tuning.jobs.create(
        model="base",
        training_file=upload(client, chat_lines(8)),
        suffix="victim",
        extra_body={"method": method(LONG)},
    )
    at_step(client, job.id, 1)
    pid = int(jobs.get_job(job.id)["worker"].rsplit(":", 1)[1])
    os.kill(pid, signal.SIGKILL)
    failed = finished(client, job.id, timeout=HEARTBEAT_TIMEOUT_S + 20)
    assert failed.status == "failed" and failed.error is not None and failed.error.code == "worker_lost"
    assert f"no heartbeat for {HEARTBEAT_TIMEOUT_S:g} s" in failed.error.message
    with pytest.raises(NotFound):
        state.store.info("victim")  # no partial artifact
    # the supervisor started a new worker: the next job runs on it
    after = client.fine_tuning.jobs.create(
        model="base",
        training_file=upload(client, chat_lines(4)),
        suffix="victim",
        extra_body={"method": method(2)},
    )
    assert finished(client, after.id).status == "succeeded"
    assert int(jobs.get_job(after.id)["worker"].rsplit(":", 1)[1]) != pid
    assert state.store.info("victim").version == 1
