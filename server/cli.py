"""`softserve` command line: run the server, manage tasks on a running server.

  softserve serve [--host H] [--port P] [--model M] [--store S]
  softserve tasks list | show TASK | push TASK PATH | delete TASK | rollback TASK [VERSION]
  softserve jobs list | show JOB | follow JOB | cancel JOB      (fine-tuning jobs)
  softserve worker [--concurrency N]                          (trains queued fine-tuning jobs)

The `tasks` commands share their flags and environment with `softserve-train push` (softserve_client):
--url ($SOFTSERVE_URL), --key ($SOFTSERVE_ADMIN_KEY), --timeout, --json, before or after the subcommand.
Human output by default; errors are one line on stderr with exit code 1 (the server refused), 2 (bad input
here) or 3 (no answer).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from server import jobs_cli
from softserve_client import (
    EXIT_USAGE,
    CliError,
    TaskClient,
    add_client_flags,
    connection,
    fail,
    given_client_flags,
    pushed_line,
    report,
    version,
    wants_json,
)

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _serve(args: argparse.Namespace) -> int:
    overrides = {"model": args.model, "store": args.store, "device": args.device, "dtype": args.dtype}
    for key, value in overrides.items():
        if value is not None:
            os.environ[f"SOFTSERVE_{key.upper()}"] = value
    from pydantic import ValidationError

    from server.settings import get_settings, settings_errors

    try:
        settings = get_settings()
    except ValidationError as exc:  # a weak key or a bad value: one line each, no traceback, no secret
        for line in settings_errors(exc):
            print(f"softserve: refusing to start: {line}", file=sys.stderr)
        return 2
    from server.request_id import log_handler

    logging.basicConfig(level=settings.log_level, handlers=[log_handler()])  # request id on every line
    from server.app import create_app
    from server.drain import DrainingServer, uvicorn_config

    app = create_app(settings)
    config = uvicorn_config(app, args.host, args.port, settings.drain_timeout_s, settings.log_level)
    server = DrainingServer(config, app, drain_timeout=settings.drain_timeout_s)
    server.run()
    return 0 if server.started else 3  # 3: uvicorn's start-up failure code


def push_files(path: Path) -> list[tuple[str, bytes]]:
    """A .safetensors artifact, a PEFT adapter directory, or a zip -> (name, bytes) parts to upload."""
    if not path.exists():
        raise CliError(f"{path}: no such file or directory", EXIT_USAGE)
    try:
        if path.is_dir():
            missing = [n for n in PEFT_FILES if not (path / n).is_file()]
            if missing:
                raise CliError(f"{path} is not a PEFT adapter directory: it has no {' or '.join(missing)}")
            return [(n, (path / n).read_bytes()) for n in PEFT_FILES]
        return [(path.name, path.read_bytes())]
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}", EXIT_USAGE) from exc


def version_ranges(versions: list[int]) -> str:
    """[1, 2, 3, 5] -> '1-3,5'."""
    spans: list[list[int]] = []
    for v in sorted(versions):
        if spans and v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in [header, *rows]]
    return "\n".join(line.rstrip() for line in lines)


def tasks_table(tasks: list[dict[str, Any]]) -> str:
    if not tasks:
        return "no tasks (push one: softserve tasks push TASK PATH)"
    rows = [
        [
            str(t.get("task_id")),
            str(t.get("version")),
            str(t.get("method")),
            version_ranges(list(t.get("versions") or [])),
            str(t.get("sha256", ""))[:12],
            str(t.get("created_at", "")),
        ]
        for t in sorted(tasks, key=lambda t: str(t.get("task_id")))
    ]
    return table(["TASK", "VERSION", "METHOD", "VERSIONS", "SHA256", "CREATED"], rows)


def task_details(t: dict[str, Any]) -> str:
    rows = [
        ["task", str(t.get("task_id"))],
        ["version", f"{t.get('version')} (current)"],
        ["versions", version_ranges(list(t.get("versions") or []))],
        ["method", str(t.get("method"))],
        ["sha256", str(t.get("sha256"))],
        ["created", str(t.get("created_at"))],
    ]
    return "\n".join(f"{k:<9} {v}" for k, v in rows)


def _list(client: TaskClient, args: argparse.Namespace) -> None:
    tasks = client.tasks()
    report(args, {"tasks": tasks}, tasks_table(tasks))


def _show(client: TaskClient, args: argparse.Namespace) -> None:
    info = client.task(args.task_id)
    report(args, info, task_details(info))


def _push(client: TaskClient, args: argparse.Namespace) -> None:
    info = client.push(args.task_id, push_files(Path(args.path)))
    report(args, info, pushed_line(info))


def _delete(client: TaskClient, args: argparse.Namespace) -> None:
    client.delete(args.task_id)
    report(args, {"task_id": args.task_id, "deleted": True}, f"deleted {args.task_id!r} and all its versions")


def _rollback(client: TaskClient, args: argparse.Namespace) -> None:
    info = client.rollback(args.task_id, args.version)
    human = (
        f"rolled back {args.task_id!r}: version {info.get('version')} is current, with the content of "
        f"version {info.get('restored_version')} (sha256 {str(info.get('sha256', ''))[:12]})"
    )
    report(args, info, human)


ACTIONS = {"list": _list, "show": _show, "push": _push, "delete": _delete, "rollback": _rollback}


def _tasks(args: argparse.Namespace) -> int:
    with TaskClient(connection(args)) as client:
        ACTIONS[args.action](client, args)
    return 0


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a version number (1, 2, ...), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softserve",
        description="Serve many soft-prompt tasks on one frozen causal LM, and manage its tasks.",
        epilog="Settings come from SOFTSERVE_* environment variables (see README: Configuration).",
    )
    parser.add_argument("--version", action="version", version=f"softserve {version()}")
    add_client_flags(parser)  # `softserve --url U tasks list` works as `softserve tasks list --url U`
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the HTTP server", description="Start the HTTP server.")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    serve.add_argument(
        "--model", help="HF model name or local path (default: embedded SmolLM2-135M-Instruct)"
    )
    serve.add_argument("--store", help="disk:PATH or redis://HOST:PORT/DB (default: disk:./data/store)")
    serve.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: auto)")
    serve.add_argument(
        "--dtype",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="model dtype (default: auto = bfloat16 on CUDA, float32 on CPU)",
    )
    serve.set_defaults(func=_serve)

    tasks = sub.add_parser(
        "tasks",
        help="list, show, push, delete or roll back tasks on a running server",
        description="Manage the tasks of a running server (the same flags as `softserve-train push`).",
    )
    add_client_flags(tasks)
    actions = tasks.add_subparsers(dest="action", required=True, metavar="ACTION")
    specs: list[tuple[str, str, list[tuple[str, dict[str, Any]]]]] = [
        ("list", "a table of the tasks and their versions", []),
        (
            "show",
            "one task: current version, versions held, method, sha256",
            [("task_id", {"metavar": "TASK"})],
        ),
        (
            "push",
            "upload a new version: an artifact (.safetensors), a PEFT adapter directory, or a zip",
            [
                ("task_id", {"metavar": "TASK"}),
                (
                    "path",
                    {"metavar": "PATH", "help": ".safetensors artifact, PEFT adapter directory, or zip"},
                ),
            ],
        ),
        ("delete", "delete a task and all its versions", [("task_id", {"metavar": "TASK"})]),
        (
            "rollback",
            "make an older version current again (as a new version with its content)",
            [
                ("task_id", {"metavar": "TASK"}),
                (
                    "version",
                    {
                        "nargs": "?",
                        "metavar": "VERSION",
                        "type": positive_int,
                        "help": "the version to restore (default: the content before the current one; "
                        "run again to go further back)",
                    },
                ),
            ],
        ),
    ]
    for name, text, positionals in specs:
        p = actions.add_parser(name, help=text, description=text[:1].upper() + text[1:] + ".")
        for dest, options in positionals:
            p.add_argument(dest, **options)
        add_client_flags(p)
    tasks.set_defaults(func=_tasks)
    jobs_cli.add_parsers(sub)  # `softserve jobs ...` and `softserve worker`
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("serve", "worker") and (given_client_flags(args) or wants_json(args)):
        flags = ", ".join(given_client_flags(args)) or "--json"
        parser.error(f"{flags}: for `softserve tasks`, not for `serve`")
    try:
        return int(args.func(args))
    except CliError as exc:
        return fail("softserve", exc)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
