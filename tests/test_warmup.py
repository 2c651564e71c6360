"""A new version is servable warm: uploads (here) and changes seen by the store watch (another replica's
upload of a task in use here) build the device prefix before the first request needs it."""

from __future__ import annotations

import time
from pathlib import Path

from api_helpers import prompt_artifact_bytes, serving, upload
from engine_refs import request

from prompt_store import from_bytes
from prompt_store.backends import DiskStore
from server.engine import Engine
from server.waiting import QueueFull


def resident_versions(state, task_id: str) -> set[int]:  # type: ignore[no-untyped-def]
    resident = state.engine.prefix_cache.keys()  # a snapshot list
    return {key[1] for key in resident if key[0] == task_id}


def test_an_acknowledged_upload_is_already_warm(tmp_path: Path) -> None:
    with serving(tmp_path) as (client, state):
        fp = state.runner.fingerprint
        assert upload(client, "t", prompt_artifact_bytes("t", fp, seed=1)).status_code == 201
        assert resident_versions(state, "t") == {1}  # built before the 201
        misses = state.engine.prefix_cache.misses
        r = client.post("/generate", json={"task_id": "t", "prompt": "hello", "max_new_tokens": 3})
        assert r.status_code == 200 and r.json()["task_version"] == 1
        assert state.engine.prefix_cache.misses == misses  # the first request hit the warm prefix


def test_another_replicas_upload_of_a_task_in_use_is_warmed_by_the_watch(tmp_path: Path) -> None:
    with serving(tmp_path) as (client, state):
        fp = state.runner.fingerprint
        assert upload(client, "used", prompt_artifact_bytes("used", fp, seed=1)).status_code == 201
        client.post("/generate", json={"task_id": "used", "prompt": "hi", "max_new_tokens": 2})
        other = DiskStore(tmp_path / "store")  # another replica writing to the same store
        assert other.put(from_bytes(prompt_artifact_bytes("used", fp, seed=2))) == 2
        assert other.put(from_bytes(prompt_artifact_bytes("unused", fp, seed=3))) == 1
        deadline = time.monotonic() + 10
        while 2 not in resident_versions(state, "used"):
            assert time.monotonic() < deadline, "the watch did not warm version 2"
            time.sleep(0.02)
        time.sleep(0.5)  # more than two polls: a task never used here is not loaded
        assert resident_versions(state, "unused") == set()


def test_a_row_that_just_finished_does_not_hold_a_queue_slot() -> None:
    """The final event is delivered before the batch is compacted; a client that immediately sends its
    next request (a closed loop at exactly max_batch + max_queue) must not be refused for that."""
    from api_helpers import tiny_runner

    engine = Engine(tiny_runner(), max_batch_size=1, max_queue=1)
    follow_ups: list[str] = []

    def on_event(event) -> None:  # type: ignore[no-untyped-def]
        if event.finish_reason is not None:
            try:  # runs on the engine thread, between the row's end and the compaction
                engine.enqueue(request([3, 4], 2), lambda e: None)
                follow_ups.append("accepted")
            except QueueFull:
                follow_ups.append("refused")

    engine.enqueue(request([1, 2], 5), on_event)
    engine.step()  # the first request runs (it ends in a later step)
    assert not follow_ups
    engine.enqueue(request([5, 6], 2), lambda e: None)  # the queue is full
    try:
        engine.enqueue(request([7], 2), lambda e: None)
        raise AssertionError("the queue should be full")
    except QueueFull:
        pass
    while not follow_ups:
        engine.step()
    assert follow_ups == ["accepted"]
