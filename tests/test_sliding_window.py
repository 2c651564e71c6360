"""Sliding-window and hybrid (sliding + global) models: greedy tokens of every soft-prompt family, in a mixed
continuously batched run and alone, == a full-recomputation Hugging Face reference, inside and beyond a window
of 8 (prompts and generations cross it; prefixes longer than it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from engine_refs import (
    IdTokenizer,
    accept_prompt,
    random_ids,
    random_prefix,
    random_prompt,
    ref_input_ids,
    request,
    task,
)
from test_engine_exactness import Case, check_cases
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from prompt_store import SoftPrompt
from runtime.attention_mask import WindowMasks
from runtime.model_runner import ModelRunner
from server.engine import Engine

WINDOW = 8
HYBRID = ["sliding_attention", "full_attention"]
ARCHS: dict[str, dict[str, Any]] = {
    "mistral": {"sliding_window": WINDOW},  # every layer sliding, one 4D mask
    "gemma2": {"sliding_window": WINDOW, "layer_types": HYBRID},  # eager, soft-capping, embeddings * sqrt(d)
    "gemma3_text": {"sliding_window": WINDOW, "layer_types": HYBRID},  # scaled embedding, local rope
    "qwen2": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},  # full, sliding
}


def tiny(model_type: str, seed: int = 0) -> Any:
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.1,
        **ARCHS[model_type],
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


@torch.inference_mode()
def ref_embeds(
    model: Any,
    ids: list[int],
    n_new: int,
    prompt: torch.Tensor | None = None,
    added: torch.Tensor | None = None,
) -> list[int]:
    """Greedy, no cache: every step runs [prompt ; embed(ids + generated) (+ added on the first s)]."""
    seq = list(ids)
    for _ in range(n_new):
        x = model.get_input_embeddings()(torch.tensor(seq))  # [n, d]
        if added is not None:
            s = min(added.shape[0], len(ids))
            x = torch.cat([x[:s] + added[:s], x[s:]])  # [n, d]
        if prompt is not None:
            x = torch.cat([prompt, x])  # [m + n, d]
        out = model(inputs_embeds=x[None], attention_mask=torch.ones(1, x.shape[0], dtype=torch.long))
        seq.append(int(out.logits[0, -1].argmax()))
    return seq[len(ids) :]


@torch.inference_mode()
def ref_kv(model: Any, prompt: SoftPrompt, ids: list[int], n_new: int) -> list[int]:
    """Greedy, no cache reuse: every step fills HF's own cache (sliding layers included) with the KV prefix
    and runs ids + generated at positions from next_position."""
    assert prompt.keys is not None and prompt.values is not None
    m, seq = prompt.keys.shape[2], list(ids)
    for _ in range(n_new):
        layers = [(prompt.keys[i][None], prompt.values[i][None]) for i in range(prompt.keys.shape[0])]
        cache = DynamicCache(ddp_cache_data=layers, config=model.config)
        out = model(
            input_ids=torch.tensor([seq]),  # [1, n]
            attention_mask=torch.ones(1, m + len(seq), dtype=torch.long),  # [1, m + n]
            position_ids=torch.arange(prompt.next_position, prompt.next_position + len(seq))[None],  # [1, n]
            cache=cache,
        )
        seq.append(int(out.logits[0, -1].argmax()))
    return seq[len(ids) :]


@torch.inference_mode()
def gist_prompt(model: Any, instruction: list[int], gists: torch.Tensor) -> SoftPrompt:
    """[instruction][gists] run once (shorter than the window, so HF's sliding cache keeps every column)."""
    x = torch.cat([model.get_input_embeddings()(torch.tensor(instruction)), gists])[None]  # [1, p + k, d]
    assert x.shape[1] < WINDOW
    cache = DynamicCache(config=model.config)
    model(inputs_embeds=x, attention_mask=torch.ones(1, x.shape[1], dtype=torch.long), cache=cache)
    p = len(instruction)
    keys = torch.stack([layer.keys[0, :, p:] for layer in cache.layers])  # [L, Hkv, k, Dh]
    values = torch.stack([layer.values[0, :, p:] for layer in cache.layers])  # [L, Hkv, k, Dh]
    return SoftPrompt(keys=keys.clone(), values=values.clone(), next_position=x.shape[1])


def cases(model: Any, runner: ModelRunner) -> list[Case]:
    d, fp = runner.hidden_size, runner.fingerprint
    g = torch.Generator().manual_seed(5)
    pt, long_pt = random_prompt(d, 3, seed=1), random_prompt(d, 11, seed=2)  # 11 > window
    px, long_px = random_prefix(fp, 4, seed=3), random_prefix(fp, 10, seed=4)  # 10 > window
    gist = gist_prompt(model, random_ids(3, seed=6), torch.randn(2, d, generator=g))
    acc = accept_prompt(d, 4, 2, seed=7)
    specs: list[tuple[str, SoftPrompt | None, int, int, int, Callable[[list[int]], list[int]]]] = [
        ("bare-inside", None, 3, 4, 0, lambda ids: ref_embeds(model, ids, 4)),
        ("bare-beyond", None, 5, 14, 0, lambda ids: ref_embeds(model, ids, 14)),
        ("bare-long", None, 12, 6, 1, lambda ids: ref_embeds(model, ids, 6)),
        ("pt", pt, 4, 10, 0, lambda ids: ref_embeds(model, ids, 10, pt.embeds)),
        ("pt-long", long_pt, 3, 7, 2, lambda ids: ref_embeds(model, ids, 7, long_pt.embeds)),
        ("prefix", px, 2, 12, 1, lambda ids: ref_kv(model, px, ids, 12)),
        ("prefix-long", long_px, 5, 6, 3, lambda ids: ref_kv(model, long_px, ids, 6)),
        ("gist", gist, 4, 11, 2, lambda ids: ref_kv(model, gist, ids, 11)),
        ("accept", acc, 3, 10, 4, lambda ids: ref_embeds(model, ids, 10, acc.embeds, acc.added)),
    ]
    out = []
    for i, (name, prompt, n, new, arrival, ref) in enumerate(specs):
        ids = random_ids(n, seed=400 + i)
        tp = task(name, name, prompt) if prompt is not None else None
        out.append(Case(name, lambda ids=ids, tp=tp, new=new: request(ids, new, tp), arrival, ref(ids)))
    return out


@pytest.mark.parametrize("model_type", list(ARCHS))
def test_sliding_window_model_matches_reference(model_type: str) -> None:
    model = tiny(model_type)
    runner = ModelRunner.from_model(model, IdTokenizer(), f"tiny-{model_type}", eos_ids=frozenset())
    assert runner.window_masks is not None and runner.window_masks.window == WINDOW
    all_cases = cases(model, runner)
    probe = random_ids(
        5, seed=401
    )  # HF generate (its own sliding cache, input_ids) agrees with the reference
    assert ref_input_ids(model, probe, 14) == all_cases[1].reference
    check_cases(Engine(runner, max_batch_size=4), all_cases)  # 9 requests: some wait for a row


@pytest.mark.parametrize("model_type", ["mistral", "gemma2"])
def test_embedding_prefix_longer_than_window_keeps_every_column(model_type: str) -> None:
    """prefix_kv of 12 embeddings: 12 columns per layer; the last window - 1 equal HF's own sliding cache."""
    model = tiny(model_type)
    runner = ModelRunner.from_model(model, IdTokenizer(), model_type, eos_ids=frozenset())
    embeds = random_prompt(runner.hidden_size, 12, seed=9).embeds
    assert embeds is not None
    keys, values = runner.prefix_kv(SoftPrompt(embeds=embeds, next_position=12))  # [L, Hkv, 12, Dh] each
    assert keys.shape[2] == 12 and values.shape[2] == 12
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(inputs_embeds=embeds[None], attention_mask=torch.ones(1, 12, dtype=torch.long), cache=cache)
    for i, layer in enumerate(cache.layers):
        kept = layer.keys.shape[2]  # window - 1 on sliding layers, 12 on full ones
        assert torch.equal(keys[i, :, 12 - kept :], layer.keys[0]), i
        assert torch.equal(values[i, :, 12 - kept :], layer.values[0]), i


def test_window_is_counted_in_real_columns_not_padding() -> None:
    """Row 0: [pad][a b][pad pad][c d e]; row 1 unpadded. Window 2 on the last 3 query columns."""
    cfg = AutoConfig.for_model("mistral", num_hidden_layers=2, sliding_window=2)
    masks = WindowMasks(cfg, "sdpa", torch.float32)
    mask = torch.tensor([[0, 1, 1, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])  # [2, 8]
    sliding = masks.build(mask, 3)
    assert isinstance(sliding, torch.Tensor) and sliding.shape == (2, 1, 3, 8)
    got = sliding[:, 0].int().tolist()
    assert got[0] == [[0, 0, 1, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0, 1, 1]]
    assert got[1] == [[0, 0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0, 1, 1]]
