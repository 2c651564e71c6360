"""ASGI middleware: refuse bodies over the limit (413) before a handler reads them, chunked ones included.

A body with a Content-Length over the limit is refused from its headers. A chunked body (no
Content-Length) is read whole, up to the limit, at the handler's first read, before any parser sees it.
Streamed straight through, the multipart parser could refuse its first bytes (400) before the limit
tripped (413), depending on how much had arrived by then; read whole, an over-limit body is always 413.
The buffer holds at most max_bytes, what the handlers hold anyway (they read uploads and JSON whole).
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLargeError(HTTPException):
    """Raised from `receive` once a (chunked) body passes the limit.

    An HTTPException so that FastAPI's body parsing re-raises it instead of turning it into a 400;
    server.errors maps it to the 413 JSON error.
    """

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {max_bytes} bytes")


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, send: Send, scope: Scope) -> None:
        message = f"request body exceeds the limit of {self.max_bytes} bytes"
        error = {"type": "body_too_large", "field": "body", "message": message}
        if str(scope.get("path", "")).startswith("/v1/"):  # OpenAI's error shape (server.errors)
            error = {"message": message, "type": "invalid_request_error", "param": "body"}
            error["code"] = "body_too_large"
        body = json.dumps({"error": error}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = self.max_bytes + 1
                if declared > self.max_bytes:
                    await self._reject(send, scope)
                    return
        received = 0
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLargeError(self.max_bytes)
            return message

        app_receive: Receive = _buffered(limited_receive, receive) if _is_chunked(scope) else limited_receive

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, app_receive, tracking_send)
        except BodyTooLargeError:
            if not response_started:
                await self._reject(send, scope)


def _is_chunked(scope: Scope) -> bool:
    headers = dict(scope.get("headers", []))
    return b"content-length" not in headers and b"chunked" in headers.get(b"transfer-encoding", b"").lower()


def _buffered(limited_receive: Receive, receive: Receive) -> Receive:
    """The app's first read gets the whole body as one message (or BodyTooLargeError once it passes the
    limit), so no parser sees a byte of a body that will turn out too large. It runs when the handler
    first reads, after routing, so the key check of the auth gate still comes before any body byte."""
    pending: list[Message] | None = None

    async def buffered_receive() -> Message:
        nonlocal pending
        if pending is None:
            parts: list[bytes] = []
            while True:
                message = await limited_receive()  # raises BodyTooLargeError past the limit
                if message["type"] != "http.request":  # a disconnect while reading: pass it on
                    pending = [{"type": "http.request", "body": b"".join(parts), "more_body": False}, message]
                    break
                parts.append(message.get("body", b""))
                if not message.get("more_body", False):
                    pending = [{"type": "http.request", "body": b"".join(parts), "more_body": False}]
                    break
        if pending:
            return pending.pop(0)
        return await receive()

    return buffered_receive
