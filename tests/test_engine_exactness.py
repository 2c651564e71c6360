"""Greedy tokens of every method in a mixed, continuously batched run == served alone == HF/PEFT reference."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
    ref_generate_with_cache,
    ref_input_ids,
    ref_inputs_embeds,
    ref_kv_prefix,
    ref_peft_forward,
    request,
    task,
)
from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model

from prompt_store import SoftPrompt
from runtime.model_runner import ModelRunner
from server.engine import Engine
from server.requests import GenerationRequest, TokenEvent


@dataclass
class Case:
    name: str
    make: Callable[[], GenerationRequest]  # a fresh request each call
    arrival: int  # engine step at which it joins the mixed run
    reference: list[int]


def llama_runner() -> ModelRunner:
    return ModelRunner.from_model(tiny_llama(seed=0), IdTokenizer(), "tiny-llama", eos_ids=frozenset())


def tiny_gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=256, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tokens_of(events: list[TokenEvent]) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


def run_mixed(engine: Engine, cases: list[Case]) -> dict[str, list[TokenEvent]]:
    """Step the engine by hand; each case joins at its arrival step (continuous batching)."""
    events: dict[str, list[TokenEvent]] = {c.name: [] for c in cases}
    step = 0
    while step < 1000:
        for c in cases:
            if c.arrival == step:
                engine.enqueue(c.make(), events[c.name].append)
        engine.step()
        step += 1
        done = all(ev and ev[-1].finish_reason for ev in events.values())
        if done and step > max(c.arrival for c in cases):
            break
    assert engine.active == 0 and engine.queue_depth == 0
    return events


def check_cases(engine: Engine, cases: list[Case]) -> None:
    mixed = run_mixed(engine, cases)
    for c in cases:
        alone = engine.generate_sync(c.make())
        assert alone[-1].finish_reason == "length", c.name
        assert tokens_of(alone) == c.reference, f"{c.name}: alone != reference"
        assert mixed[c.name][-1].finish_reason == "length", c.name
        assert tokens_of(mixed[c.name]) == c.reference, f"{c.name}: mixed batch != reference"


def peft_prompt(kind: str, m: int) -> tuple[Any, SoftPrompt]:
    """A PeftModel (its own copy of the base weights) and the serving form built from its tensors."""
    base = tiny_llama(seed=0)
    torch.manual_seed(100 + m)
    if kind == "prompt_tuning":
        cfg: Any = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=m)
    elif kind == "p_tuning":
        cfg = PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=m, encoder_hidden_size=32)
    else:
        cfg = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=m)
    model = get_peft_model(base, cfg).eval()
    if kind == "prefix_tuning":
        cache = model.get_prompt(batch_size=1)
        keys = torch.stack([layer.keys[0] for layer in cache.layers]).detach()  # [L, Hkv, m, Dh]
        values = torch.stack([layer.values[0] for layer in cache.layers]).detach()  # [L, Hkv, m, Dh]
        return model, SoftPrompt(keys=keys, values=values, next_position=m)
    embeds = model.get_prompt_embedding_to_save("default").detach()  # [m, d]
    return model, SoftPrompt(embeds=embeds, next_position=m)


@pytest.fixture(scope="module")
def llama() -> ModelRunner:
    return llama_runner()


def llama_cases(runner: ModelRunner) -> list[Case]:
    model, fp = runner.model, runner.fingerprint
    d = fp.hidden_size
    pt_model, pt = peft_prompt("prompt_tuning", 4)
    pk_model, pk = peft_prompt("p_tuning", 6)
    px_model, px = peft_prompt("prefix_tuning", 3)
    gist = make_gist(
        model, random_ids(7, seed=50), torch.randn(2, d, generator=torch.Generator().manual_seed(5))
    )
    acc, own_pt, own_px = (
        accept_prompt(d, 5, 3, seed=6),
        random_prompt(d, 8, seed=7),
        random_prefix(fp, 5, seed=8),
    )
    tasks = {
        "pt": task("peft-pt", "prompt_tuning", pt),
        "pk": task("peft-ptune", "p_tuning", pk),
        "px": task("peft-prefix", "prefix_tuning", px),
        "gist": task("gist", "gist", gist),
        "acc": task("accept", "accept", acc),
        "own_pt": task("own-pt", "prompt_tuning", own_pt),
        "own_px": task("own-prefix", "prefix_tuning", own_px),
    }

    def case(
        name: str, key: str | None, n: int, new: int, arrival: int, ref: Callable[[list[int]], list[int]]
    ) -> Case:
        ids = random_ids(n, seed=hash(name) % 10_000)
        tp = tasks[key] if key else None
        return Case(name, lambda: request(ids, new, tp), arrival, ref(ids))

    probe = random_ids(4, 1)  # PeftModel.generate is right for its first token only (see ref_peft_forward)
    assert ref_input_ids(pt_model, probe, 1) == ref_peft_forward(pt_model, probe, 1)
    px_ref = lambda ids: ref_generate_with_cache(model, px_model.get_prompt(batch_size=1), ids, 6)  # noqa: E731
    assert px_ref(probe) == ref_kv_prefix(model, px, probe, 6)  # the two KV-prefix references agree
    return [
        case("bare-a", None, 5, 10, 0, lambda ids: ref_input_ids(model, ids, 10)),
        case("peft-pt-a", "pt", 3, 8, 0, lambda ids: ref_peft_forward(pt_model, ids, 8)),
        case("peft-ptune", "pk", 4, 12, 0, lambda ids: ref_peft_forward(pk_model, ids, 12)),
        case("peft-prefix", "px", 7, 6, 0, px_ref),
        case("gist", "gist", 5, 9, 2, lambda ids: ref_kv_prefix(model, gist, ids, 9)),
        case(
            "accept-short",
            "acc",
            2,
            10,
            2,
            lambda ids: ref_inputs_embeds(model, ids, 10, acc.embeds, acc.added),
        ),
        case(
            "accept-long", "acc", 6, 7, 2, lambda ids: ref_inputs_embeds(model, ids, 7, acc.embeds, acc.added)
        ),
        case("own-pt", "own_pt", 9, 11, 5, lambda ids: ref_inputs_embeds(model, ids, 11, own_pt.embeds)),
        case("peft-pt-b", "pt", 6, 5, 5, lambda ids: ref_peft_forward(pt_model, ids, 5)),
        case("own-prefix", "own_px", 1, 8, 7, lambda ids: ref_kv_prefix(model, own_px, ids, 8)),
        case("bare-b", None, 12, 6, 9, lambda ids: ref_input_ids(model, ids, 6)),
    ]


def test_mixed_batch_matches_alone_and_reference_llama(llama: ModelRunner) -> None:
    engine = Engine(llama, max_batch_size=8)  # 11 requests: some wait for a free row
    check_cases(engine, llama_cases(llama))
    stats = engine.stats()
    assert stats["prefix_cache_hits"] > 0 and stats["prefix_cache_misses"] == 7
    assert stats["ttft_samples"] == 22 and stats["tokens_generated"] > 0


def test_gpt2_mixed_batch() -> None:
    runner = ModelRunner.from_model(tiny_gpt2(), IdTokenizer(), "tiny-gpt2", eos_ids=frozenset())
    model, fp = runner.model, runner.fingerprint
    d = fp.hidden_size
    pt, px, acc = random_prompt(d, 4, seed=1), random_prefix(fp, 3, seed=2), accept_prompt(d, 3, 2, seed=3)
    gist = make_gist(
        model, random_ids(4, seed=9), torch.randn(2, d, generator=torch.Generator().manual_seed(4))
    )
    specs: list[tuple[str, SoftPrompt | None, int, int, int, Callable[[list[int]], list[int]]]] = [
        ("bare", None, 4, 8, 0, lambda ids: ref_input_ids(model, ids, 8)),
        ("pt", pt, 6, 7, 0, lambda ids: ref_inputs_embeds(model, ids, 7, pt.embeds)),
        ("prefix", px, 3, 9, 1, lambda ids: ref_kv_prefix(model, px, ids, 9)),
        ("accept", acc, 5, 6, 3, lambda ids: ref_inputs_embeds(model, ids, 6, acc.embeds, acc.added)),
        ("gist", gist, 2, 7, 3, lambda ids: ref_kv_prefix(model, gist, ids, 7)),
    ]
    cases = []
    for i, (name, prompt, n, new, arrival, ref) in enumerate(specs):
        ids = random_ids(n, seed=200 + i)
        tp = task(name, name, prompt) if prompt is not None else None
        cases.append(Case(name, lambda ids=ids, tp=tp, new=new: request(ids, new, tp), arrival, ref(ids)))
    check_cases(Engine(runner), cases)


def test_threaded_asyncio_submit_matches_alone(llama: ModelRunner) -> None:
    d = llama.fingerprint.hidden_size
    tp = task("async-pt", "prompt_tuning", random_prompt(d, 3, seed=11))
    specs = [(random_ids(4 + i, seed=300 + i), 6 + i, tp if i % 2 else None) for i in range(5)]
    engine = Engine(llama)
    alone = [tokens_of(engine.generate_sync(request(ids, new, t))) for ids, new, t in specs]

    async def consume(req: GenerationRequest) -> list[TokenEvent]:
        engine.submit(req)
        assert req.events is not None
        out = [await req.events.get()]
        while out[-1].finish_reason is None:
            out.append(await req.events.get())
        return out

    async def main() -> list[list[TokenEvent]]:
        return await asyncio.gather(*(consume(request(ids, new, t)) for ids, new, t in specs))

    engine.start()
    try:
        results = asyncio.run(main())
    finally:
        engine.stop(drain_timeout=5)
    assert [tokens_of(r) for r in results] == alone
    assert all(r[-1].finish_reason == "length" for r in results)


def test_long_generation_grows_the_cache(llama: ModelRunner) -> None:
    """150 new tokens outgrow the cache's spare columns (buffers grow) while rows leave and join."""
    d = llama.fingerprint.hidden_size
    pt = random_prompt(d, 6, seed=21)
    tp = task("long-pt", "prompt_tuning", pt)
    model = llama.model
    cases = [
        Case(
            "long-bare",
            lambda: request(random_ids(5, 31), 150),
            0,
            ref_input_ids(model, random_ids(5, 31), 150),
        ),
        Case(
            "long-pt",
            lambda: request(random_ids(9, 32), 140, tp),
            3,
            ref_inputs_embeds(model, random_ids(9, 32), 140, pt.embeds),
        ),
        Case(
            "short", lambda: request(random_ids(4, 33), 20), 70, ref_input_ids(model, random_ids(4, 33), 20)
        ),
    ]
    check_cases(Engine(llama), cases)


def test_slack_layer_matches_plain_tensors() -> None:
    from runtime.kv_cache import SlackLayer

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 4, 5, generator=g), torch.randn(1, 3, 2, 5, generator=g)  # [B, Hkv, T, Dh]
    layer = SlackLayer.right_aligned([a, b], [a + 1, b + 1], length=6, spare=1)
    expected = torch.cat([torch.nn.functional.pad(a, (0, 0, 2, 0)), torch.nn.functional.pad(b, (0, 0, 4, 0))])
    assert torch.equal(layer.keys, expected) and torch.equal(layer.values[:2, :, 2:], a + 1)
    for _ in range(3):  # the second append outgrows the single spare column
        new = torch.randn(3, 3, 1, 5, generator=g)
        keys, _ = layer.update(new, new)
        expected = torch.cat([expected, new], dim=2)
        assert torch.equal(keys, expected)
    layer.drop_front(2)
    assert torch.equal(layer.keys, expected[:, :, 2:]) and layer.get_seq_length() == 7
