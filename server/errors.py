"""Domain errors of the server and the one table that maps every domain error to an HTTP status."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from prompt_store.errors import (
    ArtifactFormatError,
    InvalidTaskId,
    NotFound,
    StoreError,
    StoreUnavailable,
    TooLarge,
    UnsupportedAdapter,
    ValidationError,
)
from server.body_limit import BodyTooLargeError


class ServerError(Exception):
    reason = "server_error"

    def __init__(self, message: str, *, field: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.retry_after = retry_after


class LimitExceeded(ServerError):
    """A request field is over a configured limit (422, names the field and the numbers)."""

    reason = "limit"


class BadRequest(ServerError):
    reason = "bad_request"


class Unauthorized(ServerError):
    reason = "unauthorized"


class Overloaded(ServerError):
    reason = "queue_full"


class NotReady(ServerError):
    reason = "not_ready"


class DeadlineExceeded(ServerError):
    reason = "timeout"


class GenerationFailed(ServerError):
    reason = "generation_error"


class BodyTooLarge(ServerError):
    reason = "body_too_large"


STATUS_BY_ERROR: tuple[tuple[type[Exception], int], ...] = (
    (InvalidTaskId, 422),
    (TooLarge, 413),
    (ArtifactFormatError, 422),
    (UnsupportedAdapter, 422),
    (ValidationError, 422),
    (NotFound, 404),
    (StoreUnavailable, 503),
    (StoreError, 400),
    (LimitExceeded, 422),
    (BadRequest, 400),
    (Unauthorized, 401),
    (BodyTooLarge, 413),
    (Overloaded, 429),
    (NotReady, 503),
    (DeadlineExceeded, 504),
    (GenerationFailed, 500),
)


HTTP_REASONS = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}


def status_for(exc: Exception) -> int:
    for error_type, status in STATUS_BY_ERROR:
        if isinstance(exc, error_type):
            return status
    return 500


def reason_for(exc: Exception) -> str:
    return str(getattr(exc, "reason", "internal"))


def error_response(exc: StoreError | ServerError) -> JSONResponse:
    status = status_for(exc)
    body: dict[str, object] = {"error": {"type": reason_for(exc), "message": exc.message}}
    if exc.field:
        body["error"]["field"] = exc.field  # type: ignore[index]
    headers = {}
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None or status in (429, 503):
        headers["Retry-After"] = str(max(1, round(retry_after or 1)))
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body, status_code=status, headers=headers)


def count_rejection(request: Request, reason: str) -> None:
    state = getattr(request.app.state, "softserve", None)
    if state is not None:
        state.metrics.rejections.labels(reason=reason).inc()


def install_error_handlers(app: FastAPI) -> None:
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StoreError | ServerError)
        count_rejection(request, reason_for(exc))
        return error_response(exc)

    async def handle_validation(request: Request, exc: Exception) -> JSONResponse:
        """FastAPI's 422 (names each field, its limit and the value), counted as a rejection."""
        assert isinstance(exc, RequestValidationError)
        count_rejection(request, "invalid_request")
        return await request_validation_exception_handler(request, exc)

    async def handle_body_limit(request: Request, exc: Exception) -> JSONResponse:
        """A chunked body cut off at the limit while a handler was reading it."""
        assert isinstance(exc, BodyTooLargeError)
        count_rejection(request, BodyTooLarge.reason)
        response = error_response(BodyTooLarge(str(exc.detail), field="body"))
        response.headers["Connection"] = "close"  # the rest of the body is never read
        return response

    async def handle_http(request: Request, exc: Exception) -> JSONResponse:
        """Framework errors (unparsable body, unknown route, wrong method) in the same error shape."""
        assert isinstance(exc, StarletteHTTPException)
        reason = HTTP_REASONS.get(exc.status_code, "http_error")
        body = {"error": {"type": reason, "message": str(exc.detail)}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    app.add_exception_handler(StarletteHTTPException, handle_http)
    app.add_exception_handler(BodyTooLargeError, handle_body_limit)
    app.add_exception_handler(StoreError, handle)
    app.add_exception_handler(ServerError, handle)
    app.add_exception_handler(RequestValidationError, handle_validation)
