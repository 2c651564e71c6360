"""`softserve` command line: run the server, manage tasks on a running server."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = os.environ.get("SOFTSERVE_URL", "http://127.0.0.1:8000")


def _serve(args: argparse.Namespace) -> int:
    overrides = {"model": args.model, "store": args.store, "device": args.device, "dtype": args.dtype}
    for key, value in overrides.items():
        if value is not None:
            os.environ[f"SOFTSERVE_{key.upper()}"] = value
    from server.settings import get_settings

    settings = get_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from server.app import create_app
    from server.drain import DrainingServer, uvicorn_config

    app = create_app(settings)
    config = uvicorn_config(app, args.host, args.port, settings.drain_timeout_s, settings.log_level)
    server = DrainingServer(config, app, drain_timeout=settings.drain_timeout_s)
    server.run()
    return 0 if server.started else 3  # 3: uvicorn's start-up failure code


def _client(args: argparse.Namespace) -> httpx.Client:
    key = args.key or os.environ.get("SOFTSERVE_ADMIN_KEY") or os.environ.get("SOFTSERVE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=args.url, headers=headers, timeout=args.timeout)


def _print_response(response: httpx.Response) -> int:
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    if response.is_success:
        if body != "":
            print(json.dumps(body, indent=2) if not isinstance(body, str) else body)
        return 0
    print(
        f"error {response.status_code}: {json.dumps(body) if not isinstance(body, str) else body}",
        file=sys.stderr,
    )
    return 1


def _push_files(path: Path) -> list[tuple[str, tuple[str, bytes]]]:
    """A .safetensors artifact, a PEFT adapter directory, or a zip."""
    if path.is_dir():
        names = ["adapter_config.json", "adapter_model.safetensors"]
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise SystemExit(f"{path} is not a PEFT adapter directory: missing {missing}")
        return [("file", (n, (path / n).read_bytes())) for n in names]
    return [("file", (path.name, path.read_bytes()))]


def _tasks(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "list":
            return _print_response(client.get("/tasks"))
        if args.action == "show":
            return _print_response(client.get(f"/tasks/{args.task_id}"))
        if args.action == "delete":
            return _print_response(client.delete(f"/tasks/{args.task_id}"))
        return _print_response(client.put(f"/tasks/{args.task_id}", files=_push_files(Path(args.path))))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softserve",
        description="Serve many soft-prompt tasks on one frozen causal LM, and manage its tasks.",
        epilog="Settings come from SOFTSERVE_* environment variables (see README: Configuration).",
    )
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
        "--dtype", choices=["float32", "float16", "bfloat16"], help="model dtype (default: float32)"
    )
    serve.set_defaults(func=_serve)

    tasks = sub.add_parser("tasks", help="list, show, push or delete tasks on a running server")
    tasks.add_argument(
        "--url", default=DEFAULT_URL, help="server URL (default: %(default)s, or $SOFTSERVE_URL)"
    )
    tasks.add_argument("--key", help="API/admin key (default: $SOFTSERVE_ADMIN_KEY or $SOFTSERVE_API_KEY)")
    tasks.add_argument("--timeout", type=float, default=60.0, help="seconds (default: %(default)s)")
    actions = tasks.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="list tasks and their current versions")
    for name, text in (("show", "show one task"), ("delete", "delete a task and all its versions")):
        p = actions.add_parser(name, help=text)
        p.add_argument("task_id")
    push = actions.add_parser("push", help="upload an artifact (.safetensors), a PEFT adapter dir, or a zip")
    push.add_argument("task_id")
    push.add_argument("path")
    tasks.set_defaults(func=_tasks)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
