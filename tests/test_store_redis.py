"""RedisStore specifics, on a real redis-server: key layout, CAS pointer, no I/O for bad ids, watch."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from conftest import free_port
from store_helpers import INVALID_IDS, assert_same_tensors, build, wait_for, watching, with_task_id

from prompt_store import InvalidTaskId, NotFound, StoreUnavailable
from prompt_store.backends import ChangeEvent, RedisStore
from prompt_store.backends.redis_store import Keys


class RecordingRedis(redis.Redis):
    """A client that records every command (and pipeline/pubsub it hands out)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands: list[str] = []

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.commands.append(str(args[0]))
        return super().execute_command(*args, **options)

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        self.commands.append("pipeline")
        return super().pipeline(*args, **kwargs)

    def pubsub(self, **kwargs: Any) -> Any:
        self.commands.append("pubsub")
        return super().pubsub(**kwargs)


@pytest.fixture()
def admin(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture()
def store(redis_url: str) -> Iterator[RedisStore]:
    s = RedisStore(redis_url)
    yield s
    s.close()


def test_key_layout(store: RedisStore, admin: redis.Redis) -> None:
    artifact = build("layout")
    store.put(artifact)
    store.put(artifact)  # same tensors: a second version, one blob
    k = Keys("softserve")
    sha = artifact.sha256
    assert {key.decode() for key in admin.keys("*")} == {
        k.tasks,
        k.seq("layout"),
        k.current("layout"),
        k.versions("layout"),
        k.manifest("layout", 1),
        k.manifest("layout", 2),
        k.blobs("layout"),
        k.blob("layout", sha),
    }
    assert k.blob("layout", sha) == f"softserve:task:layout:blob:{sha}"
    assert admin.hgetall(k.current("layout")) == {b"version": b"2", b"sha256": sha.encode()}
    assert admin.smembers(k.tasks) == {b"layout"}
    assert json.loads(admin.get(k.manifest("layout", 2)))["version"] == 2  # type: ignore[arg-type]


def test_delete_removes_every_key_and_announces_it(store: RedisStore, admin: redis.Redis) -> None:
    store.put(build("gone", "accept", seed=1))
    store.put(build("gone", "prefix_tuning", seed=2))
    sub = admin.pubsub(ignore_subscribe_messages=True)
    sub.subscribe("softserve:events")
    sub.get_message(timeout=1)
    store.delete("gone")
    assert admin.dbsize() == 0
    message = sub.get_message(timeout=2)
    assert message is not None and json.loads(message["data"]) == {
        "task_id": "gone",
        "version": 0,
        "sha256": "",
    }
    sub.close()


def test_put_publishes_the_new_pointer(store: RedisStore, admin: redis.Redis) -> None:
    sub = admin.pubsub(ignore_subscribe_messages=True)
    sub.subscribe("softserve:events")
    sub.get_message(timeout=1)
    artifact = build("pub")
    assert store.put(artifact) == 1
    message = sub.get_message(timeout=2)
    assert message is not None
    assert json.loads(message["data"]) == {"task_id": "pub", "version": 1, "sha256": artifact.sha256}
    sub.close()


def test_a_slow_writer_never_moves_the_pointer_back(store: RedisStore, admin: redis.Redis) -> None:
    k = Keys("softserve")
    slow = build("race", seed=1)
    reserved = int(admin.incr(k.seq("race")))  # the slow writer reserved version 1 ...
    fast = build("race", seed=2)
    assert store.put(fast) == 2  # ... a fast writer committed version 2 meanwhile
    store.write_blob("race", slow.sha256, b"not needed", pipeline=None)
    store.write_manifest("race", reserved, json.dumps({"sha256": slow.sha256}))
    assert store.set_current("race", reserved, slow.sha256) is False
    assert store.info("race").version == 2
    assert_same_tensors(store.get("race"), fast)
    assert store.set_current("race", 3, fast.sha256) is True  # moving forward still works


def test_write_helpers_queue_on_the_callers_pipeline(store: RedisStore, admin: redis.Redis) -> None:
    artifact = build("rq")
    pipe = admin.pipeline(transaction=True)
    store.write_blob("rq", artifact.sha256, b"bytes", pipeline=pipe)
    store.write_manifest("rq", 1, "{}", pipeline=pipe)
    assert store.set_current("rq", 1, artifact.sha256, pipeline=pipe) is None
    store.publish(ChangeEvent("rq", 1, artifact.sha256), pipeline=pipe)
    assert admin.dbsize() == 0  # nothing sent before execute
    pipe.execute()
    assert admin.hget(Keys("softserve").current("rq"), "version") == b"1"
    assert admin.dbsize() == 7


def test_seq_catches_up_after_a_delete_race(store: RedisStore, admin: redis.Redis) -> None:
    """A put that reserved v5 and commits after a delete must not leave the counter behind."""
    k = Keys("softserve")
    artifact = build("seq")
    admin.set(k.seq("seq"), 5)
    store.set_current("seq", 5, artifact.sha256)
    admin.delete(k.seq("seq"))  # as if a delete ran between INCR and commit
    store.set_current("seq", 5, artifact.sha256)
    assert int(admin.get(k.seq("seq"))) == 5  # type: ignore[arg-type]
    assert store.put(artifact) == 6


def test_prefixes_are_isolated(redis_url: str) -> None:
    a, b = RedisStore(redis_url, prefix="alpha"), RedisStore(redis_url, prefix="beta")
    a.put(build("shared"))
    assert [i.task_id for i in a.list()] == ["shared"] and b.list() == []
    with pytest.raises(NotFound):
        b.get("shared")


@pytest.mark.parametrize("bad", INVALID_IDS)
def test_invalid_task_ids_send_nothing(redis_url: str, admin: redis.Redis, bad: str) -> None:
    client = RecordingRedis.from_url(redis_url)
    store = RedisStore(redis_url, client=client)
    store.put(build("existing"))
    keys_before = admin.dbsize()
    client.commands.clear()
    admin.config_resetstat()
    artifact = with_task_id(build("x"), bad)
    calls = [
        lambda: store.put(artifact),
        lambda: store.get(bad),
        lambda: store.get(bad, version=1),
        lambda: store.info(bad),
        lambda: store.delete(bad),
        lambda: store.write_blob(bad, "0" * 64, b""),
        lambda: store.write_manifest(bad, 1, "{}"),
        lambda: store.set_current(bad, 1, "0" * 64),
        lambda: store.publish(ChangeEvent(bad, 1)),
    ]
    for call in calls:
        with pytest.raises(InvalidTaskId):
            call()
    assert client.commands == []
    executed = {name.removeprefix("cmdstat_") for name in admin.info("commandstats")}
    assert executed <= {"config|resetstat", "config", "info"}, executed  # only the admin's own commands
    assert admin.dbsize() == keys_before
    client.close()


def test_unreachable_redis_is_store_unavailable() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0")
    start = time.monotonic()
    for call in (store.ping, lambda: store.get("t"), lambda: store.put(build("t")), store.list):
        with pytest.raises(StoreUnavailable):
            call()
    assert time.monotonic() - start < 10


def test_decoding_clients_are_refused(redis_url: str) -> None:
    with pytest.raises(ValueError, match="decode_responses"):
        RedisStore(redis_url, client=redis.Redis.from_url(redis_url, decode_responses=True))


# ---- two replicas: pub/sub, and polling when messages are lost ----------------------------------------


def test_replicas_see_each_others_puts_within_a_second(redis_url: str) -> None:
    writer, reader = RedisStore(redis_url), RedisStore(redis_url)
    with watching(reader, poll_interval=30, writer=writer) as events:  # a poll never comes: pub/sub only
        artifact = build("swap", seed=3)
        t0 = time.monotonic()
        v = writer.put(artifact)
        wait_for(lambda: ChangeEvent("swap", v, artifact.sha256) in events, timeout=1.0)
        assert time.monotonic() - t0 < 1.0
        assert_same_tensors(reader.get("swap"), artifact)


def test_each_version_is_reported_once(redis_url: str) -> None:
    writer, reader = RedisStore(redis_url), RedisStore(redis_url)
    with watching(reader, poll_interval=0.05, writer=writer) as events:  # pub/sub and many polls
        v = writer.put(build("once"))
        wait_for(lambda: len(events) >= 1, timeout=2)
        time.sleep(0.3)
        assert events == [ChangeEvent("once", v, writer.info("once").sha256)]


def test_without_pubsub_polling_converges(redis_url: str) -> None:
    writer, reader = RedisStore(redis_url), RedisStore(redis_url, pubsub=False)
    with watching(reader, poll_interval=0.3, writer=writer) as events:
        v = writer.put(build("polled"))
        waited = wait_for(lambda: any(e.task_id == "polled" and e.version == v for e in events), timeout=2)
        assert waited < 0.3 + 0.5
        writer.delete("polled")
        wait_for(lambda: ChangeEvent("polled", 0, "") in events, timeout=0.6)


def test_killed_subscription_still_converges(redis_url: str, admin: redis.Redis) -> None:
    writer, reader = RedisStore(redis_url), RedisStore(redis_url)
    with watching(reader, poll_interval=0.3, writer=writer) as events:
        assert admin.client_kill_filter(_type="pubsub") >= 1  # type: ignore[arg-type]
        v = writer.put(build("after-kill"))
        wait_for(lambda: any(e.task_id == "after-kill" and e.version == v for e in events), timeout=0.3 + 0.5)
        # and the watch keeps working afterwards (resubscribed or polling)
        v2 = writer.put(build("after-kill", seed=1))
        wait_for(lambda: any(e.task_id == "after-kill" and e.version == v2 for e in events), timeout=0.8)


def test_a_lost_message_is_caught_by_the_poll(redis_url: str, admin: redis.Redis) -> None:
    """A pointer flipped without PUBLISH (the message lost) still reaches the watcher."""
    writer, reader = RedisStore(redis_url), RedisStore(redis_url)
    k = Keys("softserve")
    with watching(reader, poll_interval=0.3, writer=writer) as events:
        artifact = build("silent")
        writer.write_blob("silent", artifact.sha256, b"...")
        writer.write_manifest("silent", 1, "{}")
        admin.hset(k.current("silent"), mapping={"version": 1, "sha256": artifact.sha256})
        admin.sadd(k.tasks, "silent")
        waited = wait_for(lambda: ChangeEvent("silent", 1, artifact.sha256) in events, timeout=1.5)
        assert waited < 0.3 + 0.5
