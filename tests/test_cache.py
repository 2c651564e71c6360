"""ServingCache: byte-bounded LRU of serving forms, pinning leases, hot swaps through change events."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from store_helpers import FP, METHOD_NAMES, build, wait_for

from prompt_store import InvalidTaskId, NotFound, ValidationError, to_serving_form
from prompt_store.backends import ChangeEvent, DiskStore, RedisStore
from prompt_store.cache import ServingCache

FORM_BYTES = 3 * 8 * 4  # prompt_tuning serving form: embeds [3, 8] float32


@pytest.fixture()
def store(tmp_path: Path) -> DiskStore:
    return DiskStore(tmp_path / "store")


@pytest.fixture()
def cache(store: DiskStore) -> Iterator[ServingCache]:
    c = ServingCache(store, FP, max_bytes=2 * FORM_BYTES)
    yield c
    c.stop_watch()


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_lease_holds_the_serving_form(store: DiskStore, method: str) -> None:
    artifact = build("t", method, seed=4)
    store.put(artifact)
    cache = ServingCache(store, FP, max_bytes=1 << 20)
    with cache.acquire("t") as lease:
        assert (lease.task.task_id, lease.task.version, lease.task.sha256, lease.task.method) == (
            "t",
            1,
            artifact.sha256,
            method,
        )
        expected = to_serving_form(artifact)
        for name in ("embeds", "keys", "values", "added"):
            got, want = getattr(lease.task.prompt, name), getattr(expected, name)
            assert (got is None) == (want is None), name
            if want is not None:
                assert torch.equal(got, want), name
        assert lease.task.prompt.next_position == expected.next_position
    assert (cache.misses, cache.hits, cache.bytes) == (1, 0, expected.nbytes())
    cache.acquire("t").release()
    assert (cache.misses, cache.hits) == (1, 1)


def test_eviction_is_by_bytes_least_recently_used_first(store: DiskStore, cache: ServingCache) -> None:
    for name in ("a", "b", "c"):
        store.put(build(name))
    cache.acquire("a").release()
    cache.acquire("b").release()
    cache.acquire("a").release()  # a is now more recent than b
    cache.acquire("c").release()  # over budget: evicts b
    assert cache.evictions == 1 and cache.bytes == 2 * FORM_BYTES
    assert sorted(k[0] for k in cache.resident_keys()) == ["a", "c"]
    hits = cache.hits
    cache.acquire("a").release()
    assert cache.hits == hits + 1
    cache.acquire("b").release()  # a miss again
    assert cache.misses == 4


def test_pinned_entries_survive_eviction(store: DiskStore, cache: ServingCache) -> None:
    for name in ("pinned", "x", "y", "z"):
        store.put(build(name))
    lease = cache.acquire("pinned")
    for name in ("x", "y", "z"):
        cache.acquire(name).release()
    assert ("pinned", 1, lease.task.sha256) in cache.resident_keys()
    assert cache.bytes <= 2 * FORM_BYTES and cache.evictions == 2
    lease.release()
    lease.release()  # idempotent
    hits = cache.hits
    cache.acquire("pinned").release()
    assert cache.hits == hits + 1


def test_all_pinned_may_exceed_the_bound_until_released(store: DiskStore, cache: ServingCache) -> None:
    for name in ("p", "q", "r"):
        store.put(build(name))
    leases = [cache.acquire(name) for name in ("p", "q", "r")]
    assert len(cache) == 3 and cache.bytes == 3 * FORM_BYTES
    for lease in leases:
        lease.release()
    assert cache.bytes <= 2 * FORM_BYTES


def test_event_switches_next_acquire_while_a_lease_keeps_the_old_version(
    store: DiskStore, cache: ServingCache
) -> None:
    old, new = build("swap", seed=1), build("swap", seed=2)
    store.put(old)
    held = cache.acquire("swap")
    store.put(new)
    assert cache.acquire("swap").task.version == 1  # memoised until an event says otherwise
    cache.apply(ChangeEvent("swap", 2, new.sha256))
    with cache.acquire("swap") as fresh:
        assert fresh.task.version == 2 and torch.equal(fresh.task.prompt.embeds, new.tensors["prompt"])
    assert held.task.version == 1 and torch.equal(held.task.prompt.embeds, old.tensors["prompt"])
    assert ("swap", 1, old.sha256) in cache.resident_keys()  # still pinned by the running request
    held.release()
    assert cache.acquire("swap", version=1).task.version == 1  # old versions stay addressable


def test_watch_thread_drives_hot_swaps(store: DiskStore, cache: ServingCache) -> None:
    store.put(build("live", seed=1))
    held = cache.acquire("live")
    cache.start_watch(poll_interval=0.02)
    wait_for(lambda: cache._thread is not None and cache._thread.is_alive(), timeout=2)
    v = 0  # the memo says 1: put at least once
    while cache.current("live") != v:  # a put racing the watch's baseline is not a change: repeat
        v = store.put(build("live", seed=v + 1))
        try:
            wait_for(lambda: cache.current("live") == v, timeout=0.5)
        except AssertionError:
            continue
    assert cache.acquire("live").task.version == v
    assert held.task.version == 1
    store.delete("live")
    wait_for(lambda: cache.current("live") is None, timeout=2)
    with pytest.raises(NotFound):
        cache.acquire("live")
    cache.stop_watch()
    assert cache._thread is None


def test_unknown_task_is_not_found_and_the_cache_does_not_grow(store: DiskStore, cache: ServingCache) -> None:
    store.put(build("known"))
    for call in (lambda: cache.acquire("unknown"), lambda: cache.acquire("known", version=9)):
        with pytest.raises(NotFound):
            call()
    assert len(cache) == 0 and cache.bytes == 0 and cache.stats()["tasks"] == 0
    with pytest.raises(InvalidTaskId):
        cache.acquire("../etc")
    assert len(cache) == 0


def test_artifacts_for_another_base_are_refused_without_growth(store: DiskStore) -> None:
    other = dataclasses.replace(FP, hidden_size=16)
    cache = ServingCache(store, other, max_bytes=1 << 20)
    store.put(build("wrong-base"))
    with pytest.raises(ValidationError, match="hidden_size"):
        cache.acquire("wrong-base")
    assert len(cache) == 0 and cache.bytes == 0


def test_a_memo_naming_a_vanished_version_is_refreshed(store: DiskStore, cache: ServingCache) -> None:
    """E.g. deleted and re-created while the events were lost: the store is asked again."""
    store.put(build("stale", seed=1))
    cache.apply(ChangeEvent("stale", 5, "f" * 64))  # a version the store does not have
    with cache.acquire("stale") as lease:
        assert lease.task.version == 1 and torch.equal(
            lease.task.prompt.embeds, build("stale", seed=1).tensors["prompt"]
        )
    assert cache.current("stale") == 1
    cache.apply(ChangeEvent("gone", 3, "f" * 64))
    with pytest.raises(NotFound):
        cache.acquire("gone")
    assert cache.current("gone") is None and len(cache) == 1


def test_a_wrong_sha_in_an_event_does_not_cause_endless_misses(store: DiskStore, cache: ServingCache) -> None:
    artifact = build("sha")
    store.put(artifact)
    cache.apply(ChangeEvent("sha", 1, "0" * 64))  # e.g. re-created under the same version number
    with cache.acquire("sha") as lease:
        assert lease.task.sha256 == artifact.sha256
    assert cache.misses == 1
    cache.acquire("sha").release()
    assert (cache.misses, cache.hits) == (1, 1)
    assert (cache.lru.hits, cache.lru.misses, cache.lru.bytes) == (cache.hits, cache.misses, cache.bytes)


def test_an_out_of_order_event_is_checked_against_the_store(store: DiskStore, cache: ServingCache) -> None:
    shas = {store.put(build("order", seed=i)): build("order", seed=i).sha256 for i in range(3)}
    cache.apply(ChangeEvent("order", 3, shas[3]))
    cache.apply(ChangeEvent("order", 2, shas[2]))  # e.g. this replica's own upload, reported late
    assert cache.current("order") == 3
    store.delete("order")
    store.put(build("order", seed=9))
    cache.apply(ChangeEvent("order", 1, build("order", seed=9).sha256))  # the delete was never reported
    assert cache.current("order") == 1
    with cache.acquire("order") as lease:
        assert torch.equal(lease.task.prompt.embeds, build("order", seed=9).tensors["prompt"])
    cache.apply(ChangeEvent("order", 0))
    assert cache.current("order") is None


def test_delete_event_forgets_the_task(store: DiskStore, cache: ServingCache) -> None:
    store.put(build("del"))
    cache.acquire("del").release()
    store.delete("del")
    cache.apply(ChangeEvent("del", 0))
    assert cache.current("del") is None and len(cache) == 0
    with pytest.raises(NotFound):
        cache.acquire("del")


def test_forms_move_to_the_requested_dtype(store: DiskStore) -> None:
    store.put(build("half"))
    cache = ServingCache(store, FP, max_bytes=1 << 20, device="cpu", dtype=torch.float16)
    with cache.acquire("half") as lease:
        assert lease.task.prompt.embeds is not None and lease.task.prompt.embeds.dtype == torch.float16
    assert cache.bytes == FORM_BYTES // 2


def test_redis_replica_cache_follows_another_writer(redis_url: str) -> None:
    writer, replica = RedisStore(redis_url), RedisStore(redis_url)
    writer.put(build("shared", seed=1))
    cache = ServingCache(replica, FP, max_bytes=1 << 20)
    held = cache.acquire("shared")
    cache.start_watch(poll_interval=0.2)
    try:
        v = 0  # the memo says 1: put at least once
        while cache.current("shared") != v:
            v = writer.put(build("shared", seed=v + 1))
            try:
                wait_for(lambda: cache.current("shared") == v, timeout=0.6)
            except AssertionError:
                continue
        with cache.acquire("shared") as lease:
            assert lease.task.version == v and lease.task.sha256 == writer.info("shared").sha256
        assert held.task.version == 1
    finally:
        cache.stop_watch()
        held.release()
