"""RedisStore retention and crash clean-up: prune old versions, remove what a failed writer left.

Each task is handled in one WATCH/MULTI/EXEC transaction over its pointer, version set and blob set, so a
put or delete that commits meanwhile makes the transaction start over, never lose a live version. Blobs are
shared by versions of equal content (keyed by sha256): one is removed only when no remaining manifest uses it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, cast

import redis
from redis.client import Pipeline

from prompt_store.backends.redis_watch import decode_pointer, text
from prompt_store.errors import InvalidTaskId
from prompt_store.task_id import validate_task_id

if TYPE_CHECKING:
    from prompt_store.backends.redis_store import RedisStore


def prune(store: RedisStore, task_id: str, keep: int, protected: Collection[int]) -> list[int]:
    """Drop every version but the newest `keep` committed ones, the current one and `protected`."""

    def choose(current: int, versions: list[int]) -> list[int]:
        committed = [v for v in versions if v <= current]
        kept = {*committed[-max(1, keep) :], current, *protected}
        return [v for v in versions if v not in kept]

    return _drop(store, task_id, choose, drop_unpointed=False)


def recover(store: RedisStore) -> list[str]:
    """Versions never made current (and blobs nobody uses) of every task; every key of a pointerless task."""
    prefix = f"{store.keys.prefix}:task:"
    task_ids = set()
    for key in store.client.scan_iter(match=f"{_glob_escape(prefix)}*", count=1000):
        task_ids.add(text(key)[len(prefix) :].split(":", 1)[0])
    removed = []
    for task_id in sorted(task_ids):
        try:
            validate_task_id(task_id)
        except InvalidTaskId:
            continue  # not a key this store wrote: left alone
        dropped = _drop(store, task_id, _never_current, drop_unpointed=True)
        removed += [f"{task_id} v{v} (never made current)" for v in dropped]
    return removed


def _never_current(current: int, versions: list[int]) -> list[int]:
    return [v for v in versions if v > current]


def _drop(
    store: RedisStore, task_id: str, choose: Callable[[int, list[int]], list[int]], *, drop_unpointed: bool
) -> list[int]:
    """Remove the versions `choose(current, versions)` names, and blobs no remaining version uses.

    With `drop_unpointed`, a task without a current pointer (a writer that never got to its flip) loses
    every key it has; otherwise such a task is left as it is.
    """
    k = store.keys
    watched = [k.current(task_id), k.versions(task_id), k.blobs(task_id), k.seq(task_id)]
    with store.client.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(*watched)
                pointer = decode_pointer(cast("dict[bytes, bytes]", pipe.hgetall(k.current(task_id))))
                versions = sorted(int(v) for v in cast("set[bytes]", pipe.smembers(k.versions(task_id))))
                shas = {text(s) for s in cast("set[bytes]", pipe.smembers(k.blobs(task_id)))}
                if pointer is None:
                    if drop_unpointed:
                        _drop_task(pipe, store, task_id, versions, shas, watched)
                        return versions
                    pipe.unwatch()
                    return []
                dropped = choose(pointer[0], versions)
                if not dropped:
                    pipe.unwatch()
                    return []
                kept = [v for v in versions if v not in dropped]
                dead = shas - _used_shas(pipe, store, task_id, kept, shas)
                pipe.multi()
                pipe.delete(*[k.manifest(task_id, v) for v in dropped])
                pipe.srem(k.versions(task_id), *dropped)
                if dead:
                    pipe.delete(*[k.blob(task_id, s) for s in dead])
                    pipe.srem(k.blobs(task_id), *dead)
                pipe.execute()
                return list(dropped)
            except redis.WatchError:
                continue


def _used_shas(
    pipe: Pipeline, store: RedisStore, task_id: str, versions: list[int], shas: set[str]
) -> set[str]:
    """Blob shas the manifests of `versions` use; every sha when one of them cannot be read (keep all)."""
    if not versions:
        return set()
    raw = cast("list[bytes | None]", pipe.mget([store.keys.manifest(task_id, v) for v in versions]))
    used = set()
    for item in raw:
        try:
            used.add(str(json.loads(text(item))["sha256"]))
        except (ValueError, TypeError, KeyError):
            return set(shas)
    return used


def _drop_task(
    pipe: Pipeline, store: RedisStore, task_id: str, versions: list[int], shas: set[str], watched: list[str]
) -> None:
    """Every key of a task that has no current pointer (nothing of it was ever served)."""
    k = store.keys
    pipe.multi()
    pipe.delete(*watched, *[k.manifest(task_id, v) for v in versions], *[k.blob(task_id, s) for s in shas])
    pipe.srem(k.tasks, task_id)
    pipe.execute()


def _glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)
