"""KV slots: admission writes only the new rows, a retirement moves at most one row per freed slot, storage is
allocated once and bounded by the KV budget, and rows that move between slots keep their exact tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from engine_refs import IdTokenizer, random_ids, random_prefix, random_prompt, request, task

from runtime.kv_slots import token_bytes
from runtime.model_runner import ModelRunner
from server.engine import Engine
from server.requests import GenerationRequest, TokenEvent
from server.waiting import QueueFull


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner.from_model(tiny_llama(seed=0), IdTokenizer(), "tiny-llama", eos_ids=frozenset())


def one_token(runner: ModelRunner) -> int:
    return token_bytes(runner.num_layers, (runner.num_kv_heads, runner.head_dim), runner.dtype)


def run_all(engine: Engine, reqs: list[GenerationRequest]) -> list[list[int]]:
    events: list[list[TokenEvent]] = [[] for _ in reqs]
    for req, sink in zip(reqs, events, strict=True):
        engine.enqueue(req, sink.append)
    while any(not e or e[-1].finish_reason is None for e in events):
        engine.step()
    for sink in events:
        assert sink[-1].finish_reason == "length", sink[-1]
    return [[e.token_id for e in sink if e.token_id is not None] for sink in events]


def buffers(engine: Engine) -> list[int]:
    kv = engine._state.kv
    return [t.data_ptr() for t in kv.keys + kv.values]


def test_admission_writes_only_new_rows_and_retirement_moves_one_row(runner: ModelRunner) -> None:
    engine = Engine(runner, max_batch_size=8, row_capacity=128)
    storage = buffers(engine)
    per_token = one_token(runner)
    running = [request(random_ids(20, seed=i), 40) for i in range(6)]
    for req in running:
        engine.enqueue(req, lambda e: None)
    engine.step()  # all six admitted (prompt 20 columns each) and one token decoded
    assert engine.kv_copied() == {"admission": 6 * 20 * per_token, "retirement": 0}
    kv = engine._state.kv
    before = [k[:6, :, :21].clone() for k in kv.keys]  # [6, Hkv, 21, Dh] each

    late = request(random_ids(10, seed=99), 40)
    engine.enqueue(late, lambda e: None)
    engine.step()  # one row of 10 columns joins; the six existing rows are not rewritten
    assert engine.kv_copied()["admission"] == 6 * 20 * per_token + 10 * per_token
    for old, k in zip(before, kv.keys, strict=True):
        assert torch.equal(old, k[:6, :, :21])  # the running rows' columns as they were

    engine.cancel(running[1].request_id)  # slot 1 frees; the last row (slot 6, 11 columns) fills it
    engine.step()
    moved = engine.kv_copied()["retirement"]
    assert 0 < moved <= max(kv.lengths) * per_token  # at most one row's KV
    assert moved == 11 * per_token
    assert buffers(engine) == storage  # the same preallocated storage throughout


def test_rows_moved_between_slots_keep_their_tokens(runner: ModelRunner) -> None:
    """Staggered lengths: rows finish in the middle of the batch and the last rows move into their slots;
    every request still gets exactly the tokens it gets alone (every serving form)."""
    d = runner.hidden_size
    tasks = [
        None,
        task("p", "prompt_tuning", random_prompt(d, 4, seed=1)),
        task("k", "prefix_tuning", random_prefix(runner.fingerprint, 3, seed=2)),
    ]
    reqs = [request(random_ids(5 + i, seed=i), 3 + 4 * (i % 4), tasks[i % 3]) for i in range(10)]
    batched = run_all(Engine(runner, max_batch_size=4, row_capacity=64), reqs)
    for req, tokens in zip(reqs, batched, strict=True):
        alone = run_all(Engine(runner, max_batch_size=1), [request(req.prompt_ids, len(tokens), req.task)])
        assert tokens == alone[0]


def test_kv_budget_bounds_the_batch_and_the_storage(runner: ModelRunner) -> None:
    row = 64 * one_token(runner)
    budget = 3 * row + row // 2  # room for three rows of 64 columns
    engine = Engine(runner, max_batch_size=32, max_queue=2, row_capacity=64, kv_cache_bytes=budget)
    assert engine.max_batch_size == 3
    assert engine._state.kv.nbytes <= budget
    reqs = [request(random_ids(8, seed=i), 6) for i in range(5)]
    for req in reqs:
        engine.enqueue(req, lambda e: None)  # 3 free slots + a queue of 2: all five wait, none fails
    with pytest.raises(QueueFull):
        engine.enqueue(request(random_ids(8, seed=9), 6), lambda e: None)
    engine.step()
    assert engine.load() == (3, 2)  # three rows hold the budget; two wait for a slot
    with pytest.raises(ValueError, match="does not hold one row"):
        Engine(runner, row_capacity=64, kv_cache_bytes=row - 1)


def test_a_row_that_cannot_fit_its_slot_fails_alone(runner: ModelRunner) -> None:
    engine = Engine(runner, max_batch_size=4, row_capacity=16)
    fits, too_long = request(random_ids(10, seed=1), 6), request(random_ids(17, seed=2), 4)
    events: dict[int, list[TokenEvent]] = {fits.request_id: [], too_long.request_id: []}
    for req in (fits, too_long):
        engine.enqueue(req, events[req.request_id].append)
    while any(not e or e[-1].finish_reason is None for e in events.values()):
        engine.step()
    assert events[too_long.request_id][-1].finish_reason == "error"
    assert "KV row capacity of 16" in (events[too_long.request_id][-1].error or "")
    assert events[fits.request_id][-1].finish_reason == "length"
    assert len([e for e in events[fits.request_id] if e.token_id is not None]) == 6


def test_generation_stops_at_the_row_capacity(runner: ModelRunner) -> None:
    engine = Engine(runner, max_batch_size=2, row_capacity=16)
    events: list[TokenEvent] = []
    engine.enqueue(request(random_ids(10, seed=3), 50), events.append)
    while not events or events[-1].finish_reason is None:
        engine.step()
    assert events[-1].finish_reason == "length"
    assert len([e for e in events if e.token_id is not None]) == 16 - 10 + 1  # the last token is never fed
