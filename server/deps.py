"""Annotated dependencies: the server state and the key rules (constant-time comparison), in one place.

The rules: with no SOFTSERVE_API_KEY, generation and reads are open whatever bearer a client sends (every
OpenAI client sends one); with it, they need it or the admin key. Writes need SOFTSERVE_ADMIN_KEY when it is
set; the generation key never grants them. Routes declare `ApiKey` or `AdminKey`; `AuthGateMiddleware`
applies the same check before the body is read, so an unauthenticated upload is refused before any of it
is received or spooled.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request
from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import Unauthorized
from server.settings import Settings
from server.state import ServerState


def get_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.softserve
    return state


StateDep = Annotated[ServerState, Depends(get_state)]


def presented_key(headers: Headers) -> str | None:
    """The key from `Authorization: Bearer` or `X-API-Key`. Keys in the query string are never accepted."""
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return headers.get("x-api-key")


def key_matches(presented: str | None, expected: SecretStr | None) -> bool:
    if expected is None or not presented:
        return False
    return hmac.compare_digest(presented.encode(), expected.get_secret_value().encode())


def check_api_key(settings: Settings, headers: Headers) -> None:
    """Generation and reads: open when no SOFTSERVE_API_KEY is set; the admin key is accepted too."""
    if settings.api_key is None:
        return
    key = presented_key(headers)
    if key_matches(key, settings.api_key) or key_matches(key, settings.admin_key):
        return
    raise Unauthorized(
        "missing or invalid API key (send 'Authorization: Bearer <key>')", field="authorization"
    )


def check_admin_key(settings: Settings, headers: Headers) -> None:
    """Task writes: need SOFTSERVE_ADMIN_KEY when it is set (the generation key never grants writes)."""
    if settings.admin_key is None:
        return
    if not key_matches(presented_key(headers), settings.admin_key):
        raise Unauthorized(
            "missing or invalid admin key (send 'Authorization: Bearer <admin key>')", field="authorization"
        )


def require_api_key(request: Request, state: StateDep) -> None:
    check_api_key(state.settings, request.headers)


def require_admin_key(request: Request, state: StateDep) -> None:
    check_admin_key(state.settings, request.headers)


ApiKey = Depends(require_api_key)
AdminKey = Depends(require_admin_key)
KeyCheck = Callable[[Settings, Headers], None]
CHECKS: tuple[tuple[Callable[..., None], KeyCheck], ...] = (
    (require_admin_key, check_admin_key),
    (require_api_key, check_api_key),
)


class KeyRefused(HTTPException):
    """Raised from `receive` when a request lacks the key its route declares.

    An HTTPException so that FastAPI's body parsing re-raises it instead of turning it into a 400;
    server.app maps it to the same 401 JSON error as the dependency (and closes the connection).
    """

    def __init__(self, error: Unauthorized) -> None:
        super().__init__(401, error.message)
        self.error = error


def declared_check(route: object) -> KeyCheck | None:
    """The key check a route declares through `AdminKey`/`ApiKey` (its own or its router's), if any."""
    calls: set[object] = set()
    stack = [getattr(route, "dependant", None)]
    while stack:
        dependant = stack.pop()
        if dependant is not None:
            calls.add(dependant.call)
            stack.extend(dependant.dependencies)
    return next((check for dep, check in CHECKS if dep in calls), None)


class AuthGateMiddleware:
    """Runs the route's key check the moment the app first asks for the request body.

    FastAPI reads and parses a body (a 60 MB multipart form is spooled to disk) before it runs a route's
    dependencies. Here the route is already chosen (scope["route"]) but not one body byte has been
    received: a request without the key its route declares is refused then, and uvicorn never reads the
    rest (nor sends `100 Continue`). Requests without a body are checked by the dependency alone.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        # per route, computed once; keyed by id (routes are unhashable) and holding the route, so that
        # an id is never reused while it is a key
        self._checks: dict[int, tuple[object, KeyCheck | None]] = {}

    def check_for(self, route: object) -> KeyCheck | None:
        if id(route) not in self._checks:
            self._checks[id(route)] = (route, declared_check(route))
        return self._checks[id(route)][1]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        checked = False

        async def gated_receive() -> Message:
            nonlocal checked
            if not checked:
                checked = True
                check = self.check_for(scope.get("route"))
                if check is not None:
                    try:
                        check(self.settings, Headers(scope=scope))
                    except Unauthorized as exc:
                        raise KeyRefused(exc) from None
            return await receive()

        await self.app(scope, gated_receive, send)
