"""Store backends: DiskStore (embedded default) and RedisStore (shared by replicas)."""

from __future__ import annotations

from pathlib import Path

from prompt_store.backends.base import ChangeEvent, Store, TaskInfo
from prompt_store.backends.disk import DiskStore
from prompt_store.backends.redis_store import RedisStore
from prompt_store.types import Limits

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def open_store(spec: str, limits: Limits | None = None) -> Store:
    """A store from a spec: "redis://..." / "rediss://..." / "unix://...", "disk:PATH", or a plain PATH."""
    if spec.startswith(_REDIS_SCHEMES):
        return RedisStore(spec, limits=limits)
    path = spec.removeprefix("disk:")
    if not path:
        raise ValueError(f"store spec {spec!r} names no directory")
    return DiskStore(Path(path).expanduser(), limits=limits)


__all__ = ["ChangeEvent", "DiskStore", "RedisStore", "Store", "TaskInfo", "open_store"]
