"""Prompt (prefix) cache: greedy tokens with the cache on equal those with it off, for every serving form,
sequential and in one step; versions, tasks and deltas never share blocks; eviction mid-admission is safe."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import tiny_llama
from engine_refs import (
    IdTokenizer,
    accept_prompt,
    make_gist,
    random_ids,
    random_prefix,
    random_prompt,
    request,
    task,
)

from prompt_store import SoftPrompt, TaskPrompt
from runtime.kv_slots import token_bytes
from runtime.model_runner import ModelRunner
from runtime.prompt_cache import BLOCK
from server.engine import Engine
from server.requests import GenerationRequest, TokenEvent

SHARED = random_ids(3 * BLOCK + 5, seed=123)  # a shared "system prompt" of 53 tokens


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner.from_model(tiny_llama(seed=0), IdTokenizer(), "tiny-llama", eos_ids=frozenset())


def tasks(runner: ModelRunner) -> dict[str, TaskPrompt | None]:
    d = runner.hidden_size
    gist = make_gist(
        runner.model, random_ids(7, seed=5), torch.randn(2, d, generator=torch.Generator().manual_seed(6))
    )
    return {
        "bare": None,
        "prompt_tuning": task("pt", "prompt_tuning", random_prompt(d, 4, seed=1)),
        "prefix_tuning": task("pre", "prefix_tuning", random_prefix(runner.fingerprint, 3, seed=2)),
        "gist": task("gist", "gist", gist),
        "accept": task("acc", "accept", accept_prompt(d, 4, 60, seed=3)),  # delta reaches past the cache
    }


def run(engine: Engine, reqs: list[GenerationRequest], together: bool) -> list[list[int]]:
    """Tokens of each request: all queued before one step (together) or each run to its end in turn."""
    sinks: list[list[TokenEvent]] = [[] for _ in reqs]

    def drain(which: list[int]) -> None:
        while any(not sinks[i] or sinks[i][-1].finish_reason is None for i in which):
            engine.step()

    if together:
        for req, sink in zip(reqs, sinks, strict=True):
            engine.enqueue(req, sink.append)
        drain(list(range(len(reqs))))
    else:
        for i, req in enumerate(reqs):
            engine.enqueue(req, sinks[i].append)
            drain([i])
    for sink in sinks:
        assert sink[-1].finish_reason == "length", sink[-1]
    return [[e.token_id for e in sink if e.token_id is not None] for sink in sinks]


def workload(runner: ModelRunner) -> Callable[[], list[GenerationRequest]]:
    """Every serving form, each with the shared prefix + short distinct suffixes (and one exact repeat)."""

    def make() -> list[GenerationRequest]:
        reqs = []
        for i, tp in enumerate(tasks(runner).values()):
            for j in range(3):
                suffix = random_ids(3 + j, seed=100 * i + j) if j < 2 else random_ids(3, seed=100 * i)
                reqs.append(request(SHARED + suffix, 6, tp))
        return reqs

    return make


@pytest.mark.parametrize("together", [False, True], ids=["in-turn", "same-step"])
def test_cache_on_equals_cache_off_for_every_serving_form(runner: ModelRunner, together: bool) -> None:
    make = workload(runner)
    off = run(Engine(runner, max_batch_size=16, prompt_cache_bytes=0), make(), together)
    engine = Engine(runner, max_batch_size=16)
    on = run(engine, make(), together)
    assert on == off
    stats = engine.stats()
    if together:  # all arrive in one step: nothing is cached yet when they are looked up
        assert stats["prompt_cache_hit_tokens"] == 0
    else:  # every later row of a form reuses the 3 shared blocks
        assert stats["prompt_cache_hit_tokens"] == 5 * 2 * 3 * BLOCK
    again = run(engine, make(), together)  # now warm either way
    assert again == off
    assert engine.stats()["prompt_cache_hit_tokens"] >= 5 * 3 * 3 * BLOCK


def test_versions_and_tasks_never_share_blocks(runner: ModelRunner) -> None:
    d = runner.hidden_size
    engine = Engine(runner, max_batch_size=4)
    v1 = task("t", "prompt_tuning", random_prompt(d, 4, seed=1), version=1)
    v2 = task("t", "prompt_tuning", random_prompt(d, 4, seed=2), version=2)
    other = task("u", "prompt_tuning", random_prompt(d, 4, seed=1))  # same tensors as v1, other task
    for tp, hits in ((v1, 0), (v1, 3 * BLOCK), (v2, 0), (other, 0), (None, 0), (v2, 3 * BLOCK)):
        req = request(SHARED + [7, 8], 2, tp)
        run(engine, [req], together=False)
        assert req.cached_tokens == hits, (tp, req.cached_tokens)


def test_deltas_never_share_blocks(runner: ModelRunner) -> None:
    """Two ACCEPT versions whose SCPP prompts are equal and whose SCAP deltas differ: no sharing, and each
    gets the tokens it gets with the cache off."""
    d = runner.hidden_size
    base = accept_prompt(d, 4, 60, seed=3)
    assert base.added is not None
    other = SoftPrompt(embeds=base.embeds, added=base.added * -1, next_position=base.next_position)
    a, b = task("acc", "accept", base, version=1), task("acc", "accept", other, version=2)
    engine = Engine(runner, max_batch_size=4)
    for tp in (a, b):
        req = request(SHARED + [9], 4, tp)
        tokens = run(engine, [req], together=False)
        assert req.cached_tokens == 0
        assert tokens == run(Engine(runner, prompt_cache_bytes=0), [request(SHARED + [9], 4, tp)], False)


def test_eviction_during_admission_changes_nothing(runner: ModelRunner) -> None:
    """A cache of two blocks: each admission inserts new blocks that evict the ones other rows of the same
    admission just looked up. Every row still gets its cache-off tokens."""
    block_bytes = BLOCK * token_bytes(runner.num_layers, (runner.num_kv_heads, runner.head_dim), runner.dtype)
    make = workload(runner)
    off = run(Engine(runner, max_batch_size=16, prompt_cache_bytes=0), make(), together=False)
    engine = Engine(runner, max_batch_size=16, prompt_cache_bytes=2 * block_bytes)
    first = make()
    run(engine, first[:1], together=False)  # warm one chain, then all together: hits, then evictions
    assert run(engine, first[1:], together=True) == off[1:]
    assert engine.stats()["prompt_cache_evictions"] > 0
    assert engine.stats()["prompt_cache_bytes"] <= 2 * block_bytes


def test_prompt_cache_lives_inside_the_kv_budget(runner: ModelRunner) -> None:
    engine = Engine(runner, max_batch_size=2, row_capacity=64, kv_cache_bytes=10**6, prompt_cache_bytes=10**9)
    assert engine._state.kv.nbytes + engine.prompt_cache.blocks.max_bytes <= 10**6
