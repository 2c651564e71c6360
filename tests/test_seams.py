"""The seams issue 13 tidied: task changes as a service (no HTTP), build_state with the engine left to the
caller (the in-process benchmarks), and train_task's one config object."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterator
from pathlib import Path

import pytest
from api_helpers import prompt_artifact_bytes, tiny_runner

from prompt_store import StoreError
from prompt_store.backends import DiskStore
from server import task_service
from server.app import build_state, shutdown_state
from server.requests import GenerationRequest, SamplingParams, TokenEvent
from server.settings import Settings
from server.state import ServerState
from training.loop import TrainConfig
from training.pipeline import TaskRunConfig, train_task


@pytest.fixture
def state(tmp_path: Path) -> Iterator[ServerState]:
    settings = Settings(store=f"disk:{tmp_path / 'store'}", store_poll_interval=0.2)
    built = build_state(settings, tiny_runner(), DiskStore(tmp_path / "store"), start_engine=False)
    try:
        yield built
    finally:
        shutdown_state(built)


def test_task_service_uploads_rolls_back_and_deletes_without_http(state: ServerState) -> None:
    base = state.runner.fingerprint
    first = task_service.store_upload(state, "svc", [("a.safetensors", prompt_artifact_bytes("x", base))])
    second = task_service.store_upload(
        state, "svc", [("b.safetensors", prompt_artifact_bytes("x", base, seed=1))]
    )
    assert (first.task_id, first.version, second.version) == ("svc", 1, 2)
    info, restored = task_service.roll_back(state, "svc", None)
    assert (info.version, restored, info.sha256) == (3, 1, first.sha256)
    task_service.delete_task(state, "svc")
    with pytest.raises(StoreError):
        state.store.info("svc")


def test_build_state_leaves_the_engine_to_a_caller_that_steps_it(state: ServerState) -> None:
    engine = state.engine
    assert not engine.is_running()
    events: list[TokenEvent] = []
    engine.enqueue(GenerationRequest([1, 2, 3], SamplingParams(max_new_tokens=3)), events.append)
    while engine.active or engine.queue_depth:
        engine.step()
    assert [e.token_id is not None for e in events].count(True) == 3
    assert events[-1].finish_reason == "length"


def test_train_task_takes_one_frozen_config() -> None:
    assert list(inspect.signature(train_task).parameters) == ["lm", "data", "cfg"]
    cfg = TaskRunConfig("prompt_tuning", "t", TrainConfig(steps=1))
    assert cfg.method_options == {} and cfg.out_dir is None and not cfg.run_eval
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.task_id = "other"  # type: ignore[misc]
