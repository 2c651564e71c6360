"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from server.deps import ApiKey, StateDep
from server.schemas import ErrorBody
from server.state import ServerState

log = logging.getLogger("softserve.health")
router = APIRouter(tags=["health"])
LIVENESS_ALLOWLIST = frozenset({"/healthz", "/readyz"})


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is alive (no dependency is checked)."""
    return {"status": "ok"}


def store_writable(state: ServerState, reachable: bool) -> bool:
    if not reachable:
        return False
    try:
        return state.store.writable()
    except Exception as exc:  # noqa: BLE001 - readiness reports any failure as not writable
        log.warning("store writability check failed: %s", exc)
        return False


@router.get("/readyz", responses={503: {"description": "not ready (same body)"}})
def readyz(state: StateDep) -> JSONResponse:
    """Model loaded, engine running, store reachable, not draining.

    `store_writable` false (a full disk, Redis at maxmemory) is reported but keeps the replica ready:
    every stored task still serves; only uploads are refused (507).
    """
    reachable = state.store_reachable()
    checks = {
        "model": True,
        "engine": state.engine.is_running(),
        "store": reachable,
        "store_writable": store_writable(state, reachable),
        "draining": state.draining,
    }
    ready = checks["engine"] and checks["store"] and not state.draining
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


@router.get(
    "/metrics",
    dependencies=[ApiKey],
    response_class=PlainTextResponse,
    responses={401: {"model": ErrorBody, "description": "missing or invalid key"}},
)
def metrics(state: StateDep) -> Response:
    """Prometheus text format; cache and engine counts are read at this scrape (server.metrics)."""
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")
