"""DiskStore specifics: layout, atomic files, task-id checks before any I/O, cross-process versioning."""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from pathlib import Path

import pytest
from store_helpers import INVALID_IDS, assert_same_tensors, build, wait_for, watching, with_task_id

from prompt_store import ArtifactFormatError, InvalidTaskId, StoreUnavailable, load
from prompt_store.backends import ChangeEvent, DiskStore, RedisStore, open_store
from prompt_store.backends.common import pointer_changes


def tree(path: Path) -> set[str]:
    """Every file and directory under path (relative), to prove nothing was created."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            out.add(os.path.relpath(os.path.join(dirpath, name), path))
    return out


@pytest.fixture()
def store(tmp_path: Path) -> DiskStore:
    return DiskStore(tmp_path / "store")


def test_layout_is_immutable_versions_plus_a_pointer(store: DiskStore) -> None:
    first, second = build("layout", seed=1), build("layout", seed=2)
    store.put(first)
    store.put(second)
    task_dir = store.root / "tasks" / "layout"
    assert sorted(os.listdir(task_dir)) == ["CURRENT", "v1.safetensors", "v2.safetensors"]
    assert (task_dir / "CURRENT").read_text() == f"2 {second.sha256}\n"
    on_disk = load(task_dir / "v1.safetensors")  # a plain artifact file, loadable by anyone
    assert on_disk.version == 1 and on_disk.task_id == "layout"
    assert_same_tensors(on_disk, first)


class FileAudit:
    """Records file-system audit events (open, listdir, mkdir, rename, ...) naming paths under a root."""

    active: FileAudit | None = None
    installed = False

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.events: list[tuple[str, str]] = []
        if not FileAudit.installed:  # audit hooks cannot be removed: install one dispatcher, once
            sys.addaudithook(FileAudit._dispatch)
            FileAudit.installed = True

    @staticmethod
    def _dispatch(event: str, args: tuple[object, ...]) -> None:
        audit = FileAudit.active
        if audit is None or not event.startswith(("open", "os.", "shutil.")):
            return
        for arg in args:
            if isinstance(arg, str | bytes | os.PathLike) and audit.root in os.fsdecode(arg):
                audit.events.append((event, os.fsdecode(arg)))

    def __enter__(self) -> FileAudit:
        FileAudit.active = self
        return self

    def __exit__(self, *exc: object) -> None:
        FileAudit.active = None


def test_file_audit_sees_store_io(store: DiskStore) -> None:
    """The probe used below does notice reads and writes of the store."""
    with FileAudit(store.root) as audit:
        store.put(build("seen"))
        store.get("seen")
    assert any(e == "open" for e, _ in audit.events) and any(e == "os.mkdir" for e, _ in audit.events)


@pytest.mark.parametrize("bad", INVALID_IDS)
def test_invalid_task_ids_touch_nothing(tmp_path: Path, bad: str) -> None:
    store = DiskStore(tmp_path / "store")
    before = tree(tmp_path)
    artifact = with_task_id(build("ok"), bad)
    calls = [
        lambda: store.put(artifact),
        lambda: store.get(bad),
        lambda: store.get(bad, version=1),
        lambda: store.info(bad),
        lambda: store.delete(bad),
    ]
    with FileAudit(tmp_path) as audit:
        for call in calls:
            with pytest.raises(InvalidTaskId):
                call()
    assert audit.events == [], "file-system access before the task id was checked"
    assert tree(tmp_path) == before


def test_get_reverifies_the_sha256(store: DiskStore) -> None:
    store.put(build("tamper"))
    path = store.root / "tasks" / "tamper" / "v1.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # flip one bit of the last tensor byte
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactFormatError, match="sha256"):
        store.get("tamper")


def test_a_file_under_the_wrong_name_is_refused(store: DiskStore) -> None:
    store.put(build("one"))
    store.put(build("two"))
    src = store.root / "tasks" / "one" / "v1.safetensors"
    (store.root / "tasks" / "two" / "v1.safetensors").write_bytes(src.read_bytes())
    with pytest.raises(ArtifactFormatError, match="expected 'two'"):
        store.get("two", version=1)


def test_delete_removes_everything(store: DiskStore) -> None:
    store.put(build("gone", seed=1))
    store.put(build("gone", seed=2))
    store.put(build("kept"))
    store.delete("gone")
    assert tree(store.root) == {"tasks", "locks", "tasks/kept", *_files("tasks/kept", 1), "locks/kept.lock"}


def _files(task_dir: str, versions: int) -> set[str]:
    return {f"{task_dir}/CURRENT", *(f"{task_dir}/v{v}.safetensors" for v in range(1, versions + 1))}


def test_leftovers_of_crashed_writers_are_ignored_then_cleaned(store: DiskStore) -> None:
    store.put(build("crash"))
    task_dir = store.root / "tasks" / "crash"
    (task_dir / ".tmp-abandoned").write_bytes(b"half a file")
    (store.root / "tasks" / ".deleted-old-1234").mkdir()  # a delete that crashed mid-rmtree
    assert [i.task_id for i in store.list()] == ["crash"]
    assert store.info("crash").versions == (1,)
    store.put(build("crash", seed=1))  # takes the lock, so any temp file is an orphan
    assert not (task_dir / ".tmp-abandoned").exists()


def _put_many(root: str, seed: int, count: int, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    store = DiskStore(root)
    out.put([store.put(build("shared", seed=seed + i)) for i in range(count)])


def test_two_processes_never_reuse_a_version(store: DiskStore) -> None:
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_put_many, args=(str(store.root), 100 * p, 6, queue)) for p in range(3)]
    for p in procs:
        p.start()
    versions = sorted(v for _ in procs for v in queue.get(timeout=60))
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert versions == list(range(1, 19))
    assert store.info("shared").version == 18 and store.info("shared").versions == tuple(range(1, 19))


def test_watch_reports_each_change_once(store: DiskStore) -> None:
    store.put(build("before"))  # part of the baseline: no event
    with watching(store, poll_interval=0.01, writer=store) as events:
        store.put(build("after"))
        sha = store.info("after").sha256
        wait_for(lambda: len(events) == 1, timeout=2)
        os.utime(store.root / "tasks" / "after" / "CURRENT")  # touched, same content: not a change
        time.sleep(0.1)  # ten polls
        assert events == [ChangeEvent("after", 1, sha)]
        store.delete("after")
        wait_for(lambda: len(events) == 2, timeout=2)
        time.sleep(0.05)
        assert events[1:] == [ChangeEvent("after", 0, "")]


def test_pointer_changes() -> None:
    old = {"kept": (2, "a"), "moved": (1, "a"), "gone": (3, "a"), "again": (4, "a"), "same-v": (1, "a")}
    new = {"kept": (2, "a"), "moved": (2, "b"), "again": (1, "c"), "same-v": (1, "d"), "born": (1, "e")}
    assert pointer_changes(old, new) == [
        ChangeEvent("gone", 0, ""),
        ChangeEvent("again", 0, ""),  # went backwards: deleted and re-created in between
        ChangeEvent("again", 1, "c"),
        ChangeEvent("born", 1, "e"),
        ChangeEvent("moved", 2, "b"),
        ChangeEvent("same-v", 0, ""),  # same number, other content: re-created too
        ChangeEvent("same-v", 1, "d"),
    ]


def test_watch_reports_a_fast_delete_and_recreate(store: DiskStore) -> None:
    store.put(build("flip", seed=1))
    store.put(build("flip", seed=2))
    with watching(store, poll_interval=0.3, writer=store) as events:
        store.delete("flip")
        store.put(build("flip", seed=3))  # both within one poll interval
        sha = store.info("flip").sha256
        wait_for(lambda: len(events) == 2, timeout=2)
        assert events == [ChangeEvent("flip", 0, ""), ChangeEvent("flip", 1, sha)]


def test_ping_and_open_store(tmp_path: Path) -> None:
    store = open_store(f"disk:{tmp_path / 'a'}")
    assert isinstance(store, DiskStore) and store.root == tmp_path / "a"
    store.ping()
    assert isinstance(open_store(str(tmp_path / "b")), DiskStore)
    assert isinstance(open_store("redis://127.0.0.1:1/0"), RedisStore)
    assert isinstance(open_store("rediss://127.0.0.1:1/0"), RedisStore)
    (tmp_path / "a" / "tasks").rename(tmp_path / "a" / "moved")
    with pytest.raises(StoreUnavailable):
        store.ping()
    with pytest.raises(ValueError):
        open_store("disk:")
