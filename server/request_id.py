"""Request ids: an `X-Request-ID` on every response, and the same id on every log line of that request.

The id is the client's `X-Request-ID` when it is a sane token (1-128 characters of [A-Za-z0-9._-]), else a
fresh one. `RequestIdMiddleware` (the outermost middleware) puts it in a context variable for the request's
whole life and adds the header to whatever answers, the body-limit 413 and the auth gate's 401 included.
Worker threads started with `run_in_threadpool` inherit the context; the engine thread does not, so a
GenerationRequest carries the id (`http_request_id`) and the engine logs it with `extra=req.log_extra`.
`RequestIdFilter` gives every log record a `request_id` attribute ("-" outside a request); `log_handler`
(the handler of `softserve serve`) writes LOG_FORMAT, which shows it. uvicorn runs with `log_config=None`
(server.drain), so its access lines reach that handler too, inside the request's context.
"""

from __future__ import annotations

import logging
import re
import sys
import uuid
from contextvars import ContextVar
from typing import TextIO

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "X-Request-ID"
MAX_CHARS = 128
VALID_ID = re.compile(rf"[A-Za-z0-9._-]{{1,{MAX_CHARS}}}")
NO_REQUEST = "-"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"

_current: ContextVar[str | None] = ContextVar("softserve_request_id", default=None)
log = logging.getLogger("softserve.http")


def current_request_id() -> str | None:
    """The id of the HTTP request being handled in this context (None outside one)."""
    return _current.get()


def accept_or_generate(presented: str | None) -> str:
    """The client's id when it is a sane token, else a new random one (32 hex characters)."""
    if presented is not None and VALID_ID.fullmatch(presented):
        return presented
    return uuid.uuid4().hex


def scope_request_id(scope: Scope) -> str | None:
    """The id the middleware gave this request (stored in the ASGI scope's state)."""
    state = scope.get("state") or {}
    value = state.get("request_id")
    return value if isinstance(value, str) else None


class RequestIdMiddleware:
    """Pure ASGI (streaming responses pass through untouched); add it last so it wraps every other layer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        presented = None
        for name, value in scope.get("headers", []):
            if name == b"x-request-id":
                presented = value.decode("latin-1")
                break
        request_id = accept_or_generate(presented)
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", []))  # mutable, whoever built it
                MutableHeaders(scope=message)[HEADER] = request_id  # replaces any the app set
            await send(message)

        token = _current.set(request_id)
        await self.app(scope, receive, send_with_id)
        _current.reset(token)  # after an exception it stays set: the server logs it with the id


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """An unhandled exception: the JSON error shape, and the request id (Starlette answers a 500 outside
    every middleware, so the header is added here). The traceback is logged by the server."""
    headers = {}
    request_id = scope_request_id(request.scope)
    if request_id is not None:
        headers[HEADER] = request_id
    body = {"error": {"type": "internal", "message": "internal server error"}}
    return JSONResponse(body, status_code=500, headers=headers)


class RequestIdFilter(logging.Filter):
    """Gives every record a `request_id`: one passed with `extra` wins, else the current request's, else -."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(getattr(record, "request_id", None), str):
            record.request_id = _current.get() or NO_REQUEST
        return True


def log_handler(stream: TextIO | None = None) -> logging.Handler:
    """A stream handler (stderr by default) writing LOG_FORMAT with the request id filled in."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    return handler
