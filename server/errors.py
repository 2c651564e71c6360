"""Domain errors of the server and the one table that maps every domain error to an HTTP status."""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from prompt_store.errors import (
    ArtifactFormatError,
    InvalidTaskId,
    NotFound,
    StoreError,
    StoreFull,
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
    (StoreFull, 507),
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


MAX_ECHO_CHARS = 256  # a refused value is echoed back at most this long
MAX_ECHO_DEPTH = 8  # ... and at most this deep (a JSON body may nest hundreds of levels)


def safe_text(text: str, limit: int | None = None) -> str:
    """`text` encodable as UTF-8: lone surrogates become their escape (\\ud800), optionally cut to `limit`."""
    if limit is not None and len(text) > limit:
        text = text[:limit] + f"... ({len(text)} characters)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def json_safe(value: Any, limit: int | None = None, depth: int = MAX_ECHO_DEPTH) -> Any:
    """Any echoed value as something JSON can always encode: finite numbers, valid text (else a string),
    nested at most `depth` levels (deeper parts become "...")."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return safe_text(value, limit)
    if isinstance(value, bytes):
        return safe_text(value.decode("utf-8", "backslashreplace"), limit)
    if isinstance(value, dict | list | tuple) and depth <= 0:
        return "..."
    if isinstance(value, dict):
        return {safe_text(str(k), limit): json_safe(v, limit, depth - 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v, limit, depth - 1) for v in value]
    return safe_text(str(value), limit)


def validation_body(exc: RequestValidationError) -> dict[str, Any]:
    """FastAPI's 422 body (each field's location, message with its limit, and the value), made safe to
    encode: the value may hold a lone surrogate or NaN, and long values are cut."""
    detail = []
    for error in exc.errors():
        entry = {key: json_safe(value) for key, value in error.items() if key not in ("input", "ctx")}
        if "input" in error:
            entry["input"] = json_safe(error["input"], MAX_ECHO_CHARS)
        if "ctx" in error:
            entry["ctx"] = json_safe(error["ctx"], MAX_ECHO_CHARS)
        detail.append(entry)
    return {"detail": detail}


def error_response(exc: StoreError | ServerError, openai: bool = False) -> JSONResponse:
    status = status_for(exc)
    body: dict[str, object] = {"error": {"type": reason_for(exc), "message": safe_text(exc.message)}}
    if openai:
        body = openai_error(exc)
    elif exc.field:
        body["error"]["field"] = safe_text(exc.field)  # type: ignore[index]
    headers = {}
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None or status in (429, 503):
        headers["Retry-After"] = str(max(1, round(retry_after or 1)))
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body, status_code=status, headers=headers)


# ---- OpenAI's error shape on /v1/*: {"error": {"message", "type", "param", "code"}} ---------------------
OPENAI_PREFIX = "/v1/"
MAX_LISTED_ERRORS = 5  # a validation error names at most this many fields in its message


def is_openai(request: Request) -> bool:
    return str(request.scope.get("path", "")).startswith(OPENAI_PREFIX)


def openai_body(status: int, message: str, param: str | None, code: str | None) -> dict[str, Any]:
    """OpenAI's error object: type invalid_request_error (4xx) or server_error (5xx); `param` is the
    request field at fault, `code` softserve's machine reason (model_not_found for an unknown model)."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    text = safe_text(message)
    return {"error": {"message": text, "type": kind, "param": param and safe_text(param), "code": code}}


def openai_error(exc: StoreError | ServerError) -> dict[str, Any]:
    """A /v1 route's only lookup is the model (= task id): the store's `task_id` is the client's `model`."""
    param = "model" if exc.field == "task_id" else exc.field
    if isinstance(exc, NotFound) and exc.field not in (None, "task_id", "model"):
        return openai_body(404, exc.message, exc.field, "not_found")  # a file or a fine-tuning job
    if isinstance(exc, NotFound):
        return openai_body(404, exc.message, "model", "model_not_found")
    return openai_body(status_for(exc), exc.message, param, reason_for(exc))


UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}  # pydantic's names of union members


def openai_param(loc: Any) -> str | None:
    """("body", "messages", 0, "content") -> "messages[0].content"; None for the body itself. Pydantic's
    union-member steps ("constrained-str", "list[int]") are left out: the client's field is the name."""
    out = ""
    for part in [p for p in loc[1:] if isinstance(p, int) or not _union_tag(str(p))]:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _union_tag(part: str) -> bool:
    return "[" in part or "-" in part or part in UNION_TAGS


def openai_validation_body(exc: RequestValidationError) -> dict[str, Any]:
    """FastAPI's 422 in OpenAI's shape: the message names each field and its limit (the client's own field
    names: the /v1 schemas use them), `param` the first field, `code` pydantic's error type."""
    errors = exc.errors()
    parts = []
    for error in errors[:MAX_LISTED_ERRORS]:
        param = None if error.get("type") == "json_invalid" else openai_param(error.get("loc", ()))
        msg = safe_text(str(error.get("msg", "invalid")), MAX_ECHO_CHARS)
        if error.get("type") == "extra_forbidden":
            msg = "unrecognized request argument (not a parameter of this route)"
        parts.append(f"{param}: {msg}" if param else msg)
    if len(errors) > MAX_LISTED_ERRORS:
        parts.append(f"... {len(errors) - MAX_LISTED_ERRORS} more")
    first = errors[0] if errors else {}
    param = None if first.get("type") == "json_invalid" else openai_param(first.get("loc", ()))
    return openai_body(422, "; ".join(parts) or "invalid request", param, str(first.get("type", "invalid")))


def count_rejection(request: Request, reason: str) -> None:
    state = getattr(request.app.state, "softserve", None)
    if state is not None:
        state.metrics.rejections.labels(reason=reason).inc()


def install_error_handlers(app: FastAPI) -> None:
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StoreError | ServerError)
        count_rejection(request, reason_for(exc))
        return error_response(exc, openai=is_openai(request))

    async def handle_validation(request: Request, exc: Exception) -> JSONResponse:
        """FastAPI's 422 (names each field, its limit and the value), counted as a rejection."""
        assert isinstance(exc, RequestValidationError)
        count_rejection(request, "invalid_request")
        if is_openai(request):
            return JSONResponse(openai_validation_body(exc), status_code=422)
        return JSONResponse(validation_body(exc), status_code=422)

    async def handle_body_limit(request: Request, exc: Exception) -> JSONResponse:
        """A chunked body cut off at the limit while a handler was reading it."""
        assert isinstance(exc, BodyTooLargeError)
        count_rejection(request, BodyTooLarge.reason)
        response = error_response(BodyTooLarge(str(exc.detail), field="body"), openai=is_openai(request))
        response.headers["Connection"] = "close"  # the rest of the body is never read
        return response

    async def handle_http(request: Request, exc: Exception) -> JSONResponse:
        """Framework errors (unparsable body, unknown route, wrong method) in the same error shape."""
        assert isinstance(exc, StarletteHTTPException)
        reason = HTTP_REASONS.get(exc.status_code, "http_error")
        body = {"error": {"type": reason, "message": safe_text(str(exc.detail))}}
        if is_openai(request):
            body = openai_body(exc.status_code, str(exc.detail), None, reason)
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    app.add_exception_handler(StarletteHTTPException, handle_http)
    app.add_exception_handler(BodyTooLargeError, handle_body_limit)
    app.add_exception_handler(StoreError, handle)
    app.add_exception_handler(ServerError, handle)
    app.add_exception_handler(RequestValidationError, handle_validation)
