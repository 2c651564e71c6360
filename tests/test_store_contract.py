"""The Store contract, run against both backends (DiskStore on a temp dir, RedisStore on a real redis)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from store_helpers import (
    METHOD_NAMES,
    assert_same_tensors,
    build,
    build_filled,
    wait_for,
    watching,
)

from prompt_store import (
    Artifact,
    ArtifactFormatError,
    NotFound,
    ValidationError,
    tensors_sha256,
    with_version,
)
from prompt_store.backends import ChangeEvent, DiskStore, RedisStore, Store


def _open(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if kind == "disk":
        return DiskStore(tmp_path / "store")
    return RedisStore(request.getfixturevalue("redis_url"))


@pytest.fixture(params=["disk", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s = _open(request.param, request, tmp_path)
    yield s
    s.close()


@pytest.fixture()
def twin(store: Store, tmp_path: Path) -> Iterator[Store]:
    """A second, independent instance on the same storage (another process in production)."""
    if isinstance(store, DiskStore):
        other: Store = DiskStore(store.root)
    else:
        assert isinstance(store, RedisStore)
        other = RedisStore(store.url)
    yield other
    other.close()


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_round_trip_every_method(store: Store, method: str) -> None:
    first, second = build("task-1", method, seed=1), build("task-1", method, seed=2)

    assert store.put(first) == 1
    got = store.get("task-1")
    assert got.version == 1 and got.manifest.method == method
    assert got.manifest.method_config == first.manifest.method_config
    assert got.sha256 == first.sha256 == tensors_sha256(got.tensors)
    assert_same_tensors(got, first)

    info = store.info("task-1")
    assert (info.task_id, info.version, info.method, info.sha256) == ("task-1", 1, method, first.sha256)
    assert info.created_at == first.manifest.created_at and info.versions == (1,)
    assert [i.task_id for i in store.list()] == ["task-1"]

    assert store.put(second) == 2
    assert_same_tensors(store.get("task-1"), second)
    old = store.get("task-1", version=1)
    assert old.version == 1
    assert_same_tensors(old, first)
    assert store.info("task-1").versions == (1, 2)
    assert store.info("task-1").sha256 == second.sha256

    store.delete("task-1")
    for call in (
        lambda: store.get("task-1"),
        lambda: store.get("task-1", version=1),
        lambda: store.info("task-1"),
        lambda: store.delete("task-1"),
    ):
        with pytest.raises(NotFound):
            call()
    assert store.list() == []


def test_versions_are_assigned_by_the_store(store: Store) -> None:
    # whatever version the artifact claims, the store numbers versions 1, 2, 3 per task
    assert [store.put(with_version(build("a", seed=i), 99)) for i in range(3)] == [1, 2, 3]
    assert store.put(build("b")) == 1
    assert store.get("a").version == 3 and store.get("a", version=2).manifest.notes == "seed 1"
    assert [(i.task_id, i.version) for i in store.list()] == [("a", 3), ("b", 1)]


def test_identical_content_gets_a_new_version(store: Store) -> None:
    artifact = build("same")
    assert store.put(artifact) == 1 and store.put(artifact) == 2
    assert_same_tensors(store.get("same", version=1), store.get("same", version=2))


def test_missing_things_are_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        store.get("nope")
    with pytest.raises(NotFound):
        store.info("nope")
    store.put(build("yes"))
    with pytest.raises(NotFound):
        store.get("yes", version=7)


def test_put_after_delete_starts_over(store: Store) -> None:
    store.put(build("again", seed=1))
    store.put(build("again", seed=2))
    store.delete("again")
    assert store.put(build("again", seed=3)) == 1
    assert store.info("again").versions == (1,)
    assert_same_tensors(store.get("again"), build("again", seed=3))


def test_put_rejects_bad_artifacts_and_stores_nothing(store: Store) -> None:
    good = build("bad")
    tampered = Artifact(good.manifest, {"prompt": good.tensors["prompt"] + 1})  # sha no longer matches
    with pytest.raises(ArtifactFormatError):
        store.put(tampered)
    wrong_shape = Artifact(good.manifest, {"prompt": torch.zeros(5, 8)})  # config says m=3
    with pytest.raises(ValidationError):
        store.put(wrong_shape)
    assert store.list() == []


def test_concurrent_puts_and_reads_stay_consistent(store: Store) -> None:
    """20 writers put versions of one task while 20 readers read it: every read is one whole version."""
    task, n = "hot", 20
    store.put(build_filled(task, 0.0))  # version 1, so readers always find a current version
    fill_of_version: dict[int, float] = {1: 0.0}
    reads: list[Artifact] = []
    errors: list[BaseException] = []
    start, writers_done = threading.Barrier(2 * n), threading.Event()

    def writer(i: int) -> None:
        start.wait()
        time.sleep(0.02 * (i % 10))  # spread the puts over the readers' loops
        version = store.put(build_filled(task, float(i)))
        fill_of_version[version] = float(i)

    def reader() -> None:
        start.wait()
        count = 0
        while count < 10 or not writers_done.is_set():  # read for as long as anyone writes
            reads.append(store.get(task))
            count += 1
            time.sleep(0.002)  # leave the writers some of the GIL

    def guarded(fn: Callable[..., None], *args: object) -> threading.Thread:
        def run() -> None:
            try:
                fn(*args)
            except BaseException as exc:  # reported below
                errors.append(exc)

        return threading.Thread(target=run)

    writers = [guarded(writer, i) for i in range(1, n + 1)]
    readers = [guarded(reader) for _ in range(n)]
    for t in writers + readers:
        t.start()
    for t in writers:
        t.join(60)
    writers_done.set()
    for t in readers:
        t.join(60)

    assert errors == []
    assert sorted(fill_of_version) == list(range(1, n + 2)), "versions must be distinct and gapless"
    assert len(reads) >= 10 * n
    assert len({a.version for a in reads}) >= 2, "reads did not overlap the writes"
    for artifact in reads:
        prompt = artifact.tensors["prompt"]  # [m, d]
        assert tensors_sha256(artifact.tensors) == artifact.sha256
        assert torch.all(prompt == fill_of_version[artifact.version]), "read mixed two versions"
    info = store.info(task)
    assert info.version == n + 1 == max(fill_of_version)
    assert info.versions == tuple(range(1, n + 2))
    assert torch.all(store.get(task).tensors["prompt"] == fill_of_version[n + 1])


def test_watch_reports_puts_and_deletes_from_another_instance(store: Store, twin: Store) -> None:
    with watching(store, poll_interval=0.1, writer=twin) as events:
        v = twin.put(build("watched"))
        sha = twin.info("watched").sha256
        wait_for(lambda: ChangeEvent("watched", v, sha) in events, timeout=2)
        twin.delete("watched")
        wait_for(lambda: ChangeEvent("watched", 0, "") in events, timeout=2)
        assert [e for e in events if e.task_id == "watched"] == [
            ChangeEvent("watched", v, sha),
            ChangeEvent("watched", 0, ""),
        ]
