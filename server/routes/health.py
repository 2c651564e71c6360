"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from server.deps import ApiKey, StateDep
from server.schemas import ErrorBody

router = APIRouter(tags=["health"])
LIVENESS_ALLOWLIST = frozenset({"/healthz", "/readyz"})


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is alive (no dependency is checked)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "not ready (same body)"}})
def readyz(state: StateDep) -> JSONResponse:
    """Model loaded, engine running, store reachable, not draining."""
    checks = {
        "model": True,
        "engine": state.engine.is_running(),
        "store": state.store_reachable(),
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
    m, stats = state.metrics, state.engine.stats()
    m.queue_depth.set(stats.get("queue_depth", 0))
    m.batch_size.set(stats.get("batch_size", 0))
    m.tokens_per_s.set(stats.get("tokens_per_s", 0.0))
    for name, cache in (("serving_forms", state.cache.lru), ("device_prefix", state.engine.prefix_cache)):
        m.cache_hits.labels(cache=name).set(cache.hits)
        m.cache_misses.labels(cache=name).set(cache.misses)
        m.cache_bytes.labels(cache=name).set(cache.bytes)
    return Response(m.render(), media_type="text/plain; version=0.0.4")
