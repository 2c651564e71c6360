"""Annotated dependencies: the server state and the two API-key checks (constant-time comparison)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from pydantic import SecretStr

from server.errors import Unauthorized
from server.state import ServerState


def get_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.softserve
    return state


StateDep = Annotated[ServerState, Depends(get_state)]


def presented_key(request: Request) -> str | None:
    """The key from `Authorization: Bearer` or `X-API-Key`. Keys in the query string are never accepted."""
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get("x-api-key")


def key_matches(presented: str | None, expected: SecretStr | None) -> bool:
    if expected is None or presented is None:
        return False
    return hmac.compare_digest(presented.encode(), expected.get_secret_value().encode())


def require_api_key(request: Request, state: StateDep) -> None:
    """Generation and reads: open when no SOFTSERVE_API_KEY is set; the admin key is accepted too."""
    settings = state.settings
    if settings.api_key is None and settings.admin_key is None:
        return
    key = presented_key(request)
    if settings.api_key is None and settings.admin_key is not None and key is None:
        return  # only an admin key is configured: reads and generation stay open
    if key_matches(key, settings.api_key) or key_matches(key, settings.admin_key):
        return
    raise Unauthorized(
        "missing or invalid API key (send 'Authorization: Bearer <key>')", field="authorization"
    )


def require_admin_key(request: Request, state: StateDep) -> None:
    """Task writes: need SOFTSERVE_ADMIN_KEY when it is set (the generation key never grants writes)."""
    expected = state.settings.admin_key
    if expected is None:
        return
    if not key_matches(presented_key(request), expected):
        raise Unauthorized(
            "missing or invalid admin key (send 'Authorization: Bearer <admin key>')", field="authorization"
        )


ApiKey = Depends(require_api_key)
AdminKey = Depends(require_admin_key)
