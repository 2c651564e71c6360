"""The HTTP side of both command lines (`softserve tasks ...` and `softserve-train push`).

Its own package because `server` and `training` never import each other, and because `prompt_store`
imports torch: `softserve tasks list` starts in a fraction of a second (this imports httpx only).

One set of flags and environment variables: --url ($SOFTSERVE_URL), --key ($SOFTSERVE_ADMIN_KEY, else
$SOFTSERVE_API_KEY), --timeout, --json. They are declared with `default=SUPPRESS` on every level of a
command line (before or after the subcommand), and `connection()` fills in what was not given.

Every failure is a `CliError`: one line on stderr and an exit code, never a traceback.
  1  the server refused (4xx/5xx; its message is shown)
  2  bad input here (a missing file, a URL without scheme, a bad flag: argparse's code too)
  3  no answer (connection refused, unknown host, timeout)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 60.0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
CLIENT_FLAGS = ("url", "key", "timeout")
MAX_MESSAGE_CHARS = 500


class CliError(RuntimeError):
    """A failure the command line reports as one line and an exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.message = " ".join(message.split())  # one line, whatever the server or the OS said
        self.code = code


def version() -> str:
    try:
        return metadata.version("softserve")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def add_client_flags(parser: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    """--url/--key/--timeout(/--json), valid on any level of the command line (defaults: SUPPRESS)."""
    g = parser.add_argument_group("server")
    g.add_argument(
        "--url",
        "--server",
        dest="url",
        default=argparse.SUPPRESS,
        help=f"server URL (default: $SOFTSERVE_URL or {DEFAULT_URL})",
    )
    g.add_argument(
        "--key",
        "--api-key",
        dest="key",
        default=argparse.SUPPRESS,
        help="admin key (default: $SOFTSERVE_ADMIN_KEY, else $SOFTSERVE_API_KEY)",
    )
    g.add_argument(
        "--timeout",
        type=float,
        default=argparse.SUPPRESS,
        help=f"seconds to wait for the server (default: {DEFAULT_TIMEOUT_S:g})",
    )
    if json_flag:
        g.add_argument(
            "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON (for scripts)"
        )


def given_client_flags(args: argparse.Namespace) -> list[str]:
    return [f"--{name}" for name in CLIENT_FLAGS if hasattr(args, name)]


def wants_json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


@dataclass(frozen=True)
class Connection:
    url: str
    key: str | None
    timeout: float


def check_url(url: str, source: str = "--url") -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        hint = f"; did you mean http://{url}?" if "://" not in url else ""
        raise CliError(f"{source} {url!r} is not an http:// or https:// URL{hint}", EXIT_USAGE)
    return url.rstrip("/")


def connection(args: argparse.Namespace) -> Connection:
    if getattr(args, "url", None):
        url = check_url(args.url)
    elif os.environ.get("SOFTSERVE_URL"):
        url = check_url(os.environ["SOFTSERVE_URL"], "SOFTSERVE_URL")
    else:
        url = DEFAULT_URL
    key = (
        getattr(args, "key", None)
        or os.environ.get("SOFTSERVE_ADMIN_KEY")
        or os.environ.get("SOFTSERVE_API_KEY")
        or None
    )
    timeout = getattr(args, "timeout", DEFAULT_TIMEOUT_S)
    if not timeout > 0:
        raise CliError(f"--timeout must be > 0 seconds, got {timeout:g}", EXIT_USAGE)
    return Connection(url, key, timeout)


def server_message(response: httpx.Response) -> str:
    """The server's error as one line: its status and message (field named), or FastAPI's details."""
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text.strip() or response.reason_phrase
    text = body if isinstance(body, str) else json.dumps(body)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        text = str(error.get("message", ""))
        field = error.get("field") or error.get("param")
        if field and str(field).lower() not in text.lower():
            text = f"{field}: {text}"
    elif isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        if isinstance(detail, list):
            parts = [
                f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg', '')}"
                for d in detail
                if isinstance(d, dict)
            ]
            text = "; ".join(parts) or json.dumps(detail)
        else:
            text = str(detail)
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[:MAX_MESSAGE_CHARS] + "..."
    line = f"server answered {response.status_code}: {text}"
    if response.status_code == 401:
        line += "; pass --key or set SOFTSERVE_ADMIN_KEY"
    return line


def _os_reason(exc: Exception) -> str:
    """'[Errno 111] Connection refused' -> 'connection refused'."""
    text = str(exc) or type(exc).__name__
    if text.startswith("[Errno"):
        text = text.split("]", 1)[-1].strip()
    return text[:1].lower() + text[1:]


class TaskClient:
    """The task routes of a running server; every failure raises CliError."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        headers = {"Authorization": f"Bearer {conn.key}"} if conn.key else {}
        headers["User-Agent"] = f"softserve-cli/{version()}"
        self._http = httpx.Client(base_url=conn.url, headers=headers, timeout=conn.timeout)

    def __enter__(self) -> TaskClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise CliError(
                f"no answer from {self.conn.url} within {self.conn.timeout:g} s", EXIT_UNREACHABLE
            ) from exc
        except httpx.TransportError as exc:
            raise CliError(
                f"cannot reach {self.conn.url}: {_os_reason(exc)} (is `softserve serve` running there?)",
                EXIT_UNREACHABLE,
            ) from exc
        if not response.is_success:
            raise CliError(server_message(response), EXIT_REFUSED)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise CliError(
                f"{self.conn.url} answered {response.status_code} with a body that is not JSON: "
                "is it a softserve server?",
                EXIT_REFUSED,
            ) from exc

    @staticmethod
    def path(task_id: str, suffix: str = "") -> str:
        return f"/tasks/{quote(task_id, safe='')}{suffix}"

    def tasks(self) -> list[dict[str, Any]]:
        return list(self.call("GET", "/tasks").get("tasks", []))

    def task(self, task_id: str) -> dict[str, Any]:
        return dict(self.call("GET", self.path(task_id)))

    def push(self, task_id: str, files: list[tuple[str, bytes]]) -> dict[str, Any]:
        parts = [("file", (name, data, "application/octet-stream")) for name, data in files]
        return dict(self.call("PUT", self.path(task_id), files=parts))

    def delete(self, task_id: str) -> None:
        self.call("DELETE", self.path(task_id))

    def rollback(self, task_id: str, version: int) -> dict[str, Any]:
        return dict(self.call("POST", self.path(task_id, "/rollback"), json={"version": version}))


def pushed_line(info: dict[str, Any]) -> str:
    return (
        f"pushed {info.get('task_id')!r}: version {info.get('version')} is current "
        f"({info.get('method')}, sha256 {str(info.get('sha256', ''))[:12]})"
    )


def report(args: argparse.Namespace, data: Any, human: str) -> None:
    """`data` as JSON with --json, else the human line(s)."""
    print(json.dumps(data, indent=2) if wants_json(args) else human)


def fail(prog: str, exc: CliError) -> int:
    print(f"{prog}: error: {exc.message}", file=sys.stderr)
    return exc.code
