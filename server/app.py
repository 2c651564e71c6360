"""FastAPI application factory: model, store, cache and engine are built in the lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from prompt_store import Limits
from prompt_store.backends import Store, open_store
from prompt_store.cache import ServingCache
from server.body_limit import BodyLimitMiddleware
from server.engine import Engine
from server.errors import install_error_handlers
from server.metrics import Metrics
from server.model_runner import ModelRunner, load_model
from server.routes import generate, health, openai, tasks
from server.settings import Settings, get_settings, redact_store
from server.state import ServerState
from server.warmup import warm_task

log = logging.getLogger("softserve")


def build_state(
    settings: Settings, runner: ModelRunner | None = None, store: Store | None = None
) -> ServerState:
    """Load (or take) the model and the store; start the cache watcher and the engine thread."""
    runner = runner or load_model(settings.model, dtype=settings.dtype, device=settings.device)
    limits = Limits(max_virtual_tokens=settings.max_virtual_tokens, max_file_bytes=settings.max_body_bytes)
    store = store or open_store(settings.store, limits=limits)
    cache = ServingCache(store, runner.fingerprint, settings.cache_bytes, limits=limits)
    cache.start_watch(settings.store_poll_interval)
    engine = Engine(
        runner,
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        prefix_cache_bytes=settings.prefix_cache_bytes,
    )
    engine.start()
    cache.on_new_version = partial(warm_task, cache, engine)  # another replica replaced a task in use here
    if settings.admin_key is None:
        log.warning(
            "SOFTSERVE_ADMIN_KEY is not set: task uploads and deletes need no key (keep it on localhost)"
        )
    return ServerState(
        settings=settings, runner=runner, engine=engine, store=store, cache=cache, metrics=Metrics()
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
        log.info("ready: model=%s store=%s", state.runner.name, redact_store(settings.store))
        try:
            yield
        finally:
            await run_in_threadpool(shutdown_state, state)
            log.info("stopped")

    app = FastAPI(
        title="softserve",
        version="0.1.0",
        description="One frozen causal LM serving many soft-prompt tasks, batched together.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    for module in (health, generate, openai, tasks):
        app.include_router(module.router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    return app
