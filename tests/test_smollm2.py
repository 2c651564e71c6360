"""Integration on the real embedded SmolLM2-135M-Instruct: a mixed batch of soft-prompt tasks is exact.

Runs in `make test` (no skip): the first run converts the bundled GGUF once (~25 s) into the model cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch
from engine_refs import (
    accept_prompt,
    make_gist,
    ref_input_ids,
    ref_inputs_embeds,
    ref_kv_prefix,
    request,
    task,
)

from prompt_store import SoftPrompt
from prompt_store.embedded_model import default_cache_dir
from runtime.model_runner import ModelRunner, load_model
from server.engine import Engine
from server.requests import GenerationRequest, TokenEvent

pytestmark = pytest.mark.timeout(180)
NEW = 8


@pytest.fixture(scope="module")
def smollm2() -> ModelRunner:
    return load_model(None, dtype="float32", device="cpu")


def chat(runner: ModelRunner, text: str) -> list[int]:
    ids = runner.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    return [int(i) for i in (ids["input_ids"] if hasattr(ids, "keys") else ids)]


def soft_prompt_from_text(runner: ModelRunner, text: str, seed: int) -> SoftPrompt:
    """A realistic embedding prefix: the embeddings of a text, slightly perturbed."""
    ids = torch.tensor(runner.tokenizer(text)["input_ids"])
    emb = runner.embed(ids).clone()  # [m, d]
    noise = torch.randn(emb.shape, generator=torch.Generator().manual_seed(seed)) * emb.std() * 0.1
    return SoftPrompt(embeds=emb + noise, next_position=emb.shape[0])


def kv_prefix_from_text(runner: ModelRunner, text: str) -> SoftPrompt:
    """A prefix-tuning form: the keys/values of a text (as a trained prefix would be shaped)."""
    prompt = SoftPrompt(embeds=runner.embed(torch.tensor(runner.tokenizer(text)["input_ids"])))
    keys, values = runner.prefix_kv(prompt)  # [L, Hkv, m, Dh] each
    return SoftPrompt(keys=keys, values=values, next_position=keys.shape[2])


def tokens_of(events: list[TokenEvent]) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


def test_smollm2_mixed_batch_is_exact(smollm2: ModelRunner) -> None:
    assert (default_cache_dir() / "model.safetensors").is_file()
    t0 = time.monotonic()
    by_path = load_model(str(default_cache_dir()), device="cpu")  # any local HF folder loads the same way
    assert by_path.fingerprint.mismatches(smollm2.fingerprint) == []
    assert time.monotonic() - t0 < 5
    runner = ModelRunner.from_model(smollm2.model, smollm2.tokenizer, smollm2.name, eos_ids=frozenset())
    model, d = runner.model, runner.hidden_size
    pt = soft_prompt_from_text(runner, "You answer like a pirate.", seed=1)
    px = kv_prefix_from_text(runner, "Always answer in French.")
    instruction = runner.tokenizer("Reply with one short sentence about animals.")["input_ids"]
    gist = make_gist(model, instruction, pt.embeds[:3])  # type: ignore[index]
    acc = accept_prompt(d, 4, 3, seed=2, scale=0.02)
    specs: list[tuple[str, SoftPrompt | None, str, int, Callable[[list[int]], list[int]]]] = [
        ("bare", None, "Name a color of the sky.", 0, lambda ids: ref_input_ids(model, ids, NEW)),
        (
            "pt",
            pt,
            "What is the capital of France?",
            0,
            lambda ids: ref_inputs_embeds(model, ids, NEW, pt.embeds),
        ),
        ("prefix", px, "How are you today?", 2, lambda ids: ref_kv_prefix(model, px, ids, NEW)),
        (
            "gist",
            gist,
            "Tell me about cats and dogs please.",
            2,
            lambda ids: ref_kv_prefix(model, gist, ids, NEW),
        ),
        ("accept", acc, "Hi!", 4, lambda ids: ref_inputs_embeds(model, ids, NEW, acc.embeds, acc.added)),
    ]
    makers: dict[str, Callable[[], GenerationRequest]] = {}
    references: dict[str, list[int]] = {}
    for name, prompt, text, _, ref in specs:
        ids = chat(runner, text)
        tp = task(f"smol-{name}", name, prompt) if prompt is not None else None
        makers[name] = lambda ids=ids, tp=tp: request(ids, NEW, tp)
        references[name] = ref(ids)
    engine = Engine(runner)
    mixed: dict[str, list[TokenEvent]] = {name: [] for name in makers}
    step = 0
    while step < 5 or engine.active or engine.queue_depth:
        for name, _, _, arrival, _ in specs:
            if arrival == step:
                engine.enqueue(makers[name](), mixed[name].append)
        engine.step()
        step += 1
    for name in makers:
        assert tokens_of(mixed[name]) == references[name], f"{name}: mixed batch != reference"
        assert tokens_of(engine.generate_sync(makers[name]())) == references[name], (
            f"{name}: alone != reference"
        )
    text = "".join(e.text for e in mixed["bare"])
    assert text == runner.tokenizer.decode(references["bare"], skip_special_tokens=True)


@pytest.mark.timeout(600)
def test_smollm2_prompt_cache_on_equals_off(smollm2: ModelRunner) -> None:
    """A shared system prompt (several cached blocks) before distinct user turns, for every serving form:
    greedy tokens with the prompt cache on (sequential, so later rows hit) equal those with it off."""
    runner = ModelRunner.from_model(smollm2.model, smollm2.tokenizer, smollm2.name, eos_ids=frozenset())
    d = runner.hidden_size
    pt = soft_prompt_from_text(runner, "You answer like a pirate.", seed=1)
    forms: dict[str, SoftPrompt | None] = {
        "bare": None,
        "pt": pt,
        "prefix": kv_prefix_from_text(runner, "Always answer in French."),
        "gist": make_gist(runner.model, runner.tokenizer("Reply briefly.")["input_ids"], pt.embeds[:2]),  # type: ignore[index]
        "accept": accept_prompt(d, 4, 40, seed=2, scale=0.02),
    }
    system = "You are a helpful assistant for a zoo. Keep answers short, kind and factual. " * 3
    turns = ("Which animal is the tallest?", "Do penguins fly?")

    def ids(turn: str) -> list[int]:
        out = runner.tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": turn}],
            add_generation_prompt=True,
            tokenize=True,
        )
        return [int(i) for i in (out["input_ids"] if hasattr(out, "keys") else out)]

    def run(engine: Engine) -> list[list[int]]:
        out = []
        for name, prompt in forms.items():
            tp = task(f"smol-cache-{name}", name, prompt) if prompt is not None else None
            for turn in turns:
                out.append(tokens_of(engine.generate_sync(request(ids(turn), 4, tp))))
        return out

    off = run(Engine(runner, max_batch_size=4, prompt_cache_bytes=0))
    engine = Engine(runner, max_batch_size=4)
    assert run(engine) == off
    assert engine.stats()["prompt_cache_hit_tokens"] >= len(forms) * 3 * 16  # every form's 2nd turn hits
