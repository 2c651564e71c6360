"""Training's view of serving: greedy decoding and the loss, both through a serving form (`SoftPrompt`).

Greedy decoding is the engine's own prefill/decode (`runtime.generate.greedy` over `runtime.batch_state`),
so what evaluation scores is what the server returns. `serving_loss` keeps a training forward (it must
let gradients flow) but takes its KV prefix from the runtime (`ModelRunner.prefix_kv`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from prompt_store import SoftPrompt
from runtime.generate import greedy, prefill_items
from training.model import runner_for


def prefix_kv(model: Any, prompt: SoftPrompt | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Serving form -> (keys, values) [L, Hkv, m, Dh] (plain tensors, usable under autograd), or None when
    there is no prefix."""
    if prompt is None:
        return None
    keys, values = runner_for(model).prefix_kv(prompt)  # [L, Hkv, m, Dh] each
    if keys.shape[2] == 0:
        return None
    return keys.clone(), values.clone()  # out of inference mode


def greedy_generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    prompt: SoftPrompt | None = None,
    max_new_tokens: int = 16,
    stop_ids: set[int] | None = None,
    batch_size: int = 8,
) -> list[list[int]]:
    """Greedy continuations of each request (token ids) under one soft prompt; stop tokens are kept.

    `model` is a `ModelRunner` (or `LoadedModel`, or a bare HF model, wrapped). Rows run `batch_size` at a
    time through the engine's prefill/decode.
    """
    runner = runner_for(model)
    items = prefill_items(runner, prompt, prompts)
    stops = stop_ids or set()
    out: list[list[int]] = []
    for i in range(0, len(items), batch_size):
        out.extend(greedy(runner, items[i : i + batch_size], max_new_tokens, stops))
    return out


def serving_loss(model: Any, batch: Any, prompt: SoftPrompt | None) -> torch.Tensor:
    """Training-style loss of a plain batch ([request][answer] rows) computed through a serving form.

    Lets tests and evals check that what was trained is what the server will run.
    """
    from training.lm import add_delta, embed_tokens, kv_cache, lm_loss

    runner = runner_for(model)
    model, device = runner.model, runner.device
    B, T = batch.input_ids.shape
    tokens = embed_tokens(model, batch.input_ids)  # [B, T, d]
    if prompt is not None and prompt.added is not None:
        tokens = add_delta(tokens, prompt.added.to(device, tokens.dtype), batch.prompt_lengths)  # [B, T, d]
    kv = prefix_kv(runner, prompt)
    m = 0 if kv is None else int(kv[0].shape[2])
    cache = None if kv is None else kv_cache(model, kv[0], kv[1], B)
    start = 0 if prompt is None else int(prompt.next_position)
    mask = torch.cat([torch.ones(B, m, dtype=torch.long), batch.attention_mask], dim=1).to(device)  # [B, m+T]
    positions = torch.arange(start, start + T, device=device)[None].expand(B, -1)  # [B, T]
    return lm_loss(model, tokens, mask, positions, batch.labels, cache=cache)
