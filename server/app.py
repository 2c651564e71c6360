"""FastAPI application factory: model, store, cache and engine are built in the lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from prompt_store import Limits
from prompt_store.backends import Store, open_store, recover_at_start
from prompt_store.cache import ServingCache
from runtime.model_runner import ModelRunner, load_model
from server.body_limit import BodyLimitMiddleware
from server.deps import ApiKey, AuthGateMiddleware, KeyRefused
from server.engine import Engine
from server.errors import ServerError, install_error_handlers
from server.fine_tuning import FineTuning
from server.metrics import CACHE_DEVICE_PREFIX, CACHE_PROMPT_BLOCKS, CACHE_SERVING_FORMS, CacheCounts, Metrics
from server.request_id import RequestIdMiddleware, internal_error
from server.routes import fine_tuning, generate, health, openai, rollback, tasks
from server.settings import Settings, get_settings, redact_store
from server.state import ServerState
from server.warmup import warm_task

log = logging.getLogger("softserve")


def build_state(
    settings: Settings,
    runner: ModelRunner | None = None,
    store: Store | None = None,
    *,
    start_engine: bool = True,
) -> ServerState:
    """Load (or take) the model and the store; start the cache watcher and the engine thread (without
    `start_engine`, the caller steps the engine itself: the in-process benchmarks)."""
    runner = runner or load_model(settings.model, dtype=settings.dtype, device=settings.device)
    limits = Limits(max_virtual_tokens=settings.max_virtual_tokens, max_file_bytes=settings.max_body_bytes)
    store = store or open_store(settings.store, limits=limits)
    recover_at_start(store)  # versions a crashed writer never made current, half-deleted tasks
    cache = ServingCache(store, runner.fingerprint, settings.cache_bytes, limits=limits)
    cache.start_watch(settings.store_poll_interval)
    engine = Engine(
        runner,
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        prefix_cache_bytes=settings.prefix_cache_bytes,
        row_capacity=settings.kv_row_tokens or settings.max_prompt_tokens + settings.max_new_tokens,
        kv_cache_bytes=settings.kv_cache_bytes,
        prompt_cache_bytes=settings.prompt_cache_bytes,
    )
    if start_engine:
        engine.start()
    cache.on_new_version = partial(warm_task, cache, engine)  # another replica replaced a task in use here
    metrics = Metrics(max_tasks=settings.metrics_max_tasks)
    caches: dict[str, CacheCounts] = {
        CACHE_SERVING_FORMS: cache.lru,
        CACHE_DEVICE_PREFIX: engine.prefix_cache,
        CACHE_PROMPT_BLOCKS: engine.prompt_cache.blocks,
    }
    metrics.track(caches, engine.stats)
    return ServerState(
        settings=settings, runner=runner, engine=engine, store=store, cache=cache, metrics=metrics
    )


def shutdown_state(state: ServerState) -> None:
    state.draining = True
    state.engine.stop(drain_timeout=state.settings.drain_timeout_s)
    state.cache.stop_watch()
    state.store.close()


def create_app(
    settings: Settings | None = None, *, runner: ModelRunner | None = None, store: Store | None = None
) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await run_in_threadpool(build_state, settings, runner, store)
        app.state.softserve = state
        app.state.fine_tuning = FineTuning(settings)  # files, jobs, queue; the supervised local worker
        app.state.fine_tuning.start()
        if settings.admin_key is None:
            log.warning(
                "SOFTSERVE_ADMIN_KEY is not set: task uploads and deletes need no key (keep it on localhost)"
            )
        log.info("ready: model=%s store=%s", state.runner.name, redact_store(settings.store))
        try:
            yield
        finally:
            await run_in_threadpool(app.state.fine_tuning.stop)
            await run_in_threadpool(shutdown_state, state)
            log.info("stopped")

    app = FastAPI(
        title="softserve",
        version="0.1.0",
        description="One frozen causal LM serving many soft-prompt tasks, batched together.",
        lifespan=lifespan,
        docs_url=None,  # served by add_docs, behind the API key
        redoc_url=None,
        openapi_url=None,
    )
    install_error_handlers(app)
    for module in (health, generate, openai, tasks, rollback, fine_tuning):
        app.include_router(module.router)
    add_docs(app, public=settings.public_docs)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    # a request without the key its route needs is refused before its body is read
    app.add_middleware(AuthGateMiddleware, settings=settings)
    app.add_exception_handler(KeyRefused, refuse_key)
    # outermost: every response (the body limit's 413 included) carries X-Request-ID, and every log line
    # of the request shows it; an unhandled exception's 500 adds it itself (Starlette answers it outside)
    app.add_middleware(RequestIdMiddleware)
    app.add_exception_handler(Exception, internal_error)
    return app


async def refuse_key(request: Request, exc: Exception) -> Response:
    """The gate's 401, answered (and counted) by the same handler as the dependency's; the connection is
    closed, as the rest of the body is never read."""
    assert isinstance(exc, KeyRefused)
    handler = request.app.exception_handlers[ServerError]
    response: Response = await handler(request, exc.error)
    response.headers["Connection"] = "close"
    return response


def add_docs(app: FastAPI, *, public: bool) -> None:
    """/openapi.json, /docs, /redoc: behind SOFTSERVE_API_KEY when it is set, unless SOFTSERVE_PUBLIC_DOCS."""
    dependencies = [] if public else [ApiKey]

    @app.get("/openapi.json", include_in_schema=False, dependencies=dependencies)
    def openapi_json() -> JSONResponse:
        return JSONResponse(app.openapi())

    def spec_url(request: Request) -> str:  # behind a proxy's root_path, as FastAPI's own docs do
        return request.scope.get("root_path", "").rstrip("/") + "/openapi.json"

    @app.get("/docs", include_in_schema=False, dependencies=dependencies)
    def swagger_docs(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=spec_url(request), title=f"{app.title} - docs")

    @app.get("/redoc", include_in_schema=False, dependencies=dependencies)
    def redoc_docs(request: Request) -> HTMLResponse:
        return get_redoc_html(openapi_url=spec_url(request), title=f"{app.title} - ReDoc")
