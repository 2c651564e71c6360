"""Everything a request handler needs, built once at start-up and kept on `app.state.softserve`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prompt_store import Limits
from prompt_store.backends import Store
from prompt_store.cache import ServingCache
from server.metrics import Metrics
from server.settings import Settings

if TYPE_CHECKING:
    from runtime.model_runner import ModelRunner
    from server.engine import Engine

log = logging.getLogger("softserve.state")


@dataclass
class ServerState:
    settings: Settings
    runner: ModelRunner
    engine: Engine
    store: Store
    cache: ServingCache
    metrics: Metrics = field(default_factory=Metrics)
    draining: bool = False

    @property
    def limits(self) -> Limits:
        return Limits(
            max_virtual_tokens=self.settings.max_virtual_tokens, max_file_bytes=self.settings.max_body_bytes
        )

    def store_reachable(self) -> bool:
        try:
            self.store.ping()
        except Exception as exc:  # noqa: BLE001 - readiness reports any failure as not ready
            log.warning("store not reachable: %s", exc)
            return False
        return True
