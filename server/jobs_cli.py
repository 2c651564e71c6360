"""`softserve jobs list|show|follow|cancel` (fine-tuning jobs of a running server) and `softserve worker`.

`jobs` shares the client flags of `softserve tasks` (--url, --key, --timeout, --json). `follow` prints each
new event and a progress bar (step/total, loss, ETA) until the job ends: exit 0 when it succeeded, 1 when
it failed or was cancelled. `worker` runs `python -m jobs.worker` in this process (the server never imports
the trainers).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any
from urllib.parse import quote

from softserve_client import (
    EXIT_REFUSED,
    CliError,
    TaskClient,
    add_client_flags,
    connection,
    report,
    wants_json,
)

TERMINAL = ("succeeded", "failed", "cancelled")
FOLLOW_POLL_S = 1.0


def job_line(job: dict[str, Any]) -> str:
    p = job.get("progress") or {}
    step = f"{p.get('step', 0)}/{p.get('total_steps') or '?'}"
    loss = f"loss {p['loss']:.4f}" if p.get("loss") is not None else ""
    eta = f"ETA {p['eta_seconds']:.0f} s" if p.get("eta_seconds") is not None else ""
    model = job.get("fine_tuned_model") or job.get("suffix") or ""
    error = (job.get("error") or {}).get("message", "")
    return "  ".join(x for x in (job["id"], job["status"], model, step, loss, eta, error) if x)


def _path(job_id: str, suffix: str = "") -> str:
    return f"/v1/fine_tuning/jobs/{quote(job_id, safe='')}{suffix}"


def _list(client: TaskClient, args: argparse.Namespace) -> int:
    jobs = client.call("GET", "/v1/fine_tuning/jobs", params={"limit": args.limit})["data"]
    report(args, jobs, "\n".join(job_line(j) for j in jobs) or "no fine-tuning jobs")
    return 0


def _show(client: TaskClient, args: argparse.Namespace) -> int:
    job = client.call("GET", _path(args.job_id))
    report(args, job, job_line(job))
    return 0


def _cancel(client: TaskClient, args: argparse.Namespace) -> int:
    job = client.call("POST", _path(args.job_id, "/cancel"))
    report(args, job, job_line(job))
    return 0


def _follow(client: TaskClient, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    seen: set[str] = set()
    bar = None
    while True:
        job = client.call("GET", _path(args.job_id))
        events = client.call("GET", _path(args.job_id, "/events"), params={"limit": 100})["data"]
        for event in reversed(events):
            if event["id"] not in seen:
                seen.add(event["id"])
                if event.get("type") != "metrics":
                    (bar.write if bar is not None else print)(event["message"])
        p = job.get("progress") or {}
        if bar is None and p.get("total_steps"):
            bar = tqdm(total=p["total_steps"], desc=job["id"], file=sys.stderr, disable=wants_json(args))
        if bar is not None:
            bar.n = p.get("step") or 0
            bar.set_postfix_str(f"loss={p['loss']:.4f}" if p.get("loss") is not None else "")
        if job["status"] in TERMINAL:
            if bar is not None:
                bar.close()
            report(args, job, job_line(job))
            if job["status"] != "succeeded":
                raise CliError(f"job {job['id']} {job['status']}", EXIT_REFUSED)
            return 0
        time.sleep(FOLLOW_POLL_S)


ACTIONS = {"list": _list, "show": _show, "follow": _follow, "cancel": _cancel}


def _jobs(args: argparse.Namespace) -> int:
    with TaskClient(connection(args)) as client:
        return ACTIONS[args.action](client, args)


def _worker(args: argparse.Namespace) -> int:
    flags = [(f"--{k}", getattr(args, k)) for k in ("concurrency", "store", "model")]
    argv = [sys.executable, "-m", "jobs.worker", *[x for k, v in flags if v is not None for x in (k, str(v))]]
    os.execv(sys.executable, argv)  # noqa: S606 - our own module, this interpreter
    return 0  # pragma: no cover


def add_parsers(sub: Any) -> None:
    jobs = sub.add_parser(
        "jobs",
        help="list, show, follow or cancel fine-tuning jobs on a running server",
        description="Fine-tuning jobs of a running server (/v1/fine_tuning/jobs).",
    )
    add_client_flags(jobs)
    actions = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser("list", help="the newest jobs, one line each")
    p.add_argument("--limit", type=int, default=20, help="at most this many (%(default)s)")
    add_client_flags(p)
    for name, text in (
        ("show", "one job: status, step/total, loss, ETA"),
        ("follow", "print a job's events and a progress bar until it ends"),
        ("cancel", "cancel a job (a running one stops at its next training step)"),
    ):
        p = actions.add_parser(name, help=text, description=text[:1].upper() + text[1:] + ".")
        p.add_argument("job_id", metavar="JOB")
        add_client_flags(p)
    jobs.set_defaults(func=_jobs)

    worker = sub.add_parser(
        "worker",
        help="run a fine-tuning worker (point any number of them at one Redis store)",
        description="Train queued fine-tuning jobs: `python -m jobs.worker` with the server's SOFTSERVE_* "
        "settings (SOFTSERVE_STORE, SOFTSERVE_MODEL, SOFTSERVE_WORKER_CONCURRENCY, ...).",
    )
    worker.add_argument(
        "--concurrency", type=int, help="jobs at once (default: SOFTSERVE_WORKER_CONCURRENCY, 1)"
    )
    worker.add_argument("--store", help="disk:PATH or redis://HOST:PORT/DB (default: SOFTSERVE_STORE)")
    worker.add_argument("--model", help="the served model (default: SOFTSERVE_MODEL, the embedded SmolLM2)")
    worker.set_defaults(func=_worker)
