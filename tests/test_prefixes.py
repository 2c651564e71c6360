"""Cold prefixes admitted together are converted in one batched forward, with the same KV as one by one."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from conftest import tiny_llama
from engine_refs import IdTokenizer, random_ids, random_prefix, random_prompt, request, task

from prompt_store.lru import ByteLRU
from runtime.model_runner import ModelRunner
from server.engine import Engine
from server.prefixes import device_prefixes


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner.from_model(tiny_llama(seed=0), IdTokenizer(), "tiny-llama", eos_ids=frozenset())


def count_forwards(runner: ModelRunner) -> list[int]:
    """Wrap the model's forward; the list's length is the number of calls since."""
    calls: list[int] = []
    forward = runner.model.forward

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return forward(*args, **kwargs)

    runner.model.forward = counted
    return calls


def test_batched_embedding_prefixes_equal_one_by_one(runner: ModelRunner) -> None:
    d = runner.hidden_size
    prompts = [random_prompt(d, m, seed=m) for m in (3, 9, 1, 6)]
    batched = runner.embedding_prefix_kvs([p.embeds for p in prompts if p.embeds is not None])
    for prompt, (keys, values) in zip(prompts, batched, strict=True):
        want_k, want_v = runner.prefix_kv(prompt)  # [L, Hkv, m, Dh] each
        assert keys.shape == want_k.shape
        torch.testing.assert_close(keys, want_k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(values, want_v, rtol=1e-5, atol=1e-5)


def test_cold_tasks_cost_one_forward_and_decode_like_alone(runner: ModelRunner) -> None:
    d, fp = runner.hidden_size, runner.fingerprint
    tasks = [task(f"emb-{i}", "prompt_tuning", random_prompt(d, 2 + 3 * i, seed=10 + i)) for i in range(4)]
    tasks.append(task("kv", "prefix_tuning", random_prefix(fp, 4, seed=3)))
    ids = [random_ids(5 + i, seed=i) for i in range(len(tasks))]

    alone = []
    for t, p in zip(tasks, ids, strict=True):
        engine = Engine(runner)
        alone.append(engine.generate_sync(request(p, 6, t)))

    engine = Engine(runner)
    calls = count_forwards(runner)
    try:
        found = device_prefixes(runner, engine.prefix_cache, tasks + tasks[:2])  # repeats are converted once
        assert len(calls) == 1 and set(found) == {t.key for t in tasks}
        assert engine.prefix_cache.misses == len(tasks)
        calls.clear()
        engine = Engine(runner)  # cold again, now through the engine: 1 prefix forward + prefill + decode
        events = [[] for _ in tasks]  # type: ignore[var-annotated]
        for t, p, ev in zip(tasks, ids, events, strict=True):
            engine.enqueue(request(p, 6, t), ev.append)
        engine.step()
        assert len(calls) == 3  # prefixes of all four embedding tasks, the group prefill, one decode
    finally:
        del runner.model.forward
    while engine.active:
        engine.step()
    tokens = [[e.token_id for e in ev if e.token_id is not None] for ev in events]
    assert tokens == [[e.token_id for e in ev if e.token_id is not None] for ev in alone]


def test_a_bad_prefix_fails_only_its_own_request(runner: ModelRunner) -> None:
    d = runner.hidden_size
    good = task("good", "prompt_tuning", random_prompt(d, 3, seed=1))
    other = task("other", "prompt_tuning", random_prompt(d, 4, seed=2))
    bad_prompt = dataclasses.replace(random_prompt(d, 3, seed=3), next_position=1)  # < m: check_prefix fails
    bad = task("bad", "prompt_tuning", bad_prompt)
    cache: ByteLRU[Any, Any] = ByteLRU(1 << 30)
    assert set(device_prefixes(runner, cache, [good, bad, other])) == {good.key, other.key}
    engine = Engine(runner)
    evs: list[list[Any]] = [[], [], []]
    for t, ev in zip((good, bad, other), evs, strict=True):
        engine.enqueue(request([1, 2, 3], 3, t), ev.append)
    while engine.active or engine.queue_depth:
        engine.step()
    assert [ev[-1].finish_reason for ev in evs] == ["length", "error", "length"]
    assert "next_position" in (evs[1][-1].error or "")
