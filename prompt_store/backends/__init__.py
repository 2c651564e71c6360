"""Store backends: DiskStore (embedded default) and RedisStore (shared by replicas)."""

from __future__ import annotations

import logging
from pathlib import Path

from prompt_store.backends.base import ChangeEvent, Store, TaskInfo
from prompt_store.backends.disk import DiskStore
from prompt_store.backends.redis_store import RedisStore
from prompt_store.errors import StoreError
from prompt_store.types import Limits

log = logging.getLogger(__name__)

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def open_store(spec: str, limits: Limits | None = None) -> Store:
    """A store from a spec: "redis://..." / "rediss://..." / "unix://...", "disk:PATH", or a plain PATH."""
    if spec.startswith(_REDIS_SCHEMES):
        return RedisStore(spec, limits=limits)
    path = spec.removeprefix("disk:")
    if not path:
        raise ValueError(f"store spec {spec!r} names no directory")
    return DiskStore(Path(path).expanduser(), limits=limits)


def recover_at_start(store: Store) -> list[str]:
    """store.recover(), logging what it removed; a store that cannot be reached now is only logged."""
    try:
        removed = store.recover()
    except StoreError as exc:
        log.warning("store clean-up at start skipped: %s", exc)
        return []
    for item in removed:
        log.info("store clean-up at start removed %s", item)
    return removed


__all__ = ["ChangeEvent", "DiskStore", "RedisStore", "Store", "TaskInfo", "open_store", "recover_at_start"]
