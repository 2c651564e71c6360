"""Greedy decoding through a serving form (`SoftPrompt`), the way the server runs it.

An embedding prefix runs once at positions 0..m-1 to become a KV prefix; a KV prefix is used as is. Rows
are left-padded inside the batch; each request starts at the prompt's `next_position`, the ACCEPT delta is
added to its first s real tokens, and the attention mask covers prefix + request + generated tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache

from prompt_store import SoftPrompt
from training.lm import embed_tokens, kv_cache, layer_kv, model_device, model_dtype


@torch.no_grad()
def prefix_kv(model: Any, prompt: SoftPrompt | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Serving form -> (keys, values) [L, Hkv, m, Dh], or None when there is no prefix."""
    if prompt is None:
        return None
    if prompt.keys is not None and prompt.values is not None:
        return prompt.keys, prompt.values
    if prompt.embeds is None or prompt.embeds.shape[0] == 0:
        return None
    device = model_device(model)
    embeds = prompt.embeds.to(device, model_dtype(model))[None]  # [1, m, d]
    m = embeds.shape[1]
    cache = DynamicCache(config=model.config)
    model.base_model(
        inputs_embeds=embeds,  # [1, m, d]
        attention_mask=torch.ones(1, m, dtype=torch.long, device=device),  # [1, m]
        position_ids=torch.arange(m, device=device)[None],  # [1, m]
        cache=cache,
        use_cache=True,
    )
    layers = [layer_kv(cache, i) for i in range(len(cache.layers))]  # [1, Hkv, m, Dh] each
    keys = torch.stack([k[0] for k, _ in layers])  # [L, Hkv, m, Dh]
    values = torch.stack([v[0] for _, v in layers])  # [L, Hkv, m, Dh]
    return keys, values


@torch.no_grad()
def _greedy_batch(
    model: Any,
    rows: Sequence[Sequence[int]],
    prompt: SoftPrompt | None,
    kv: tuple[torch.Tensor, torch.Tensor] | None,
    max_new_tokens: int,
    stop_ids: set[int],
) -> list[list[int]]:
    device = model_device(model)
    B, width = len(rows), max(len(r) for r in rows)
    pads = torch.tensor([width - len(r) for r in rows], device=device)  # [B]
    ids = torch.zeros(B, width, dtype=torch.long, device=device)  # [B, W]
    for b, r in enumerate(rows):
        ids[b, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
    embeds = embed_tokens(model, ids)  # [B, W, d]
    if prompt is not None and prompt.added is not None:
        added = prompt.added.to(device, embeds.dtype)  # [s, d]
        for b, r in enumerate(rows):
            s = min(int(added.shape[0]), len(r))
            start = width - len(r)
            embeds[b, start : start + s] += added[:s]  # [s, d]
    m = 0 if kv is None else int(kv[0].shape[2])
    start_pos = 0 if prompt is None else int(prompt.next_position)
    cache = DynamicCache(config=model.config) if kv is None else kv_cache(model, kv[0], kv[1], B)
    col = torch.arange(width, device=device)[None]  # [1, W]
    real = col >= pads[:, None]  # [B, W]
    mask = torch.cat([torch.ones(B, m, dtype=torch.long, device=device), real.long()], dim=1)  # [B, m+W]
    positions = (start_pos + col - pads[:, None]).clamp(min=0)  # [B, W]
    lengths = torch.tensor([len(r) for r in rows], device=device)  # [B]
    out: list[list[int]] = [[] for _ in rows]
    done = torch.zeros(B, dtype=torch.bool, device=device)  # [B]
    for step in range(max_new_tokens):
        logits = model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]  # [B, V]
        nxt = logits.argmax(dim=-1)  # [B]
        for b in range(B):
            if not done[b]:
                out[b].append(int(nxt[b]))
                done[b] = int(nxt[b]) in stop_ids
        if bool(done.all()):
            break
        embeds = embed_tokens(model, nxt[:, None])  # [B, 1, d]
        mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long, device=device)], dim=1)  # [B, m+W+t]
        positions = (start_pos + lengths + step)[:, None]  # [B, 1]
    return out


def greedy_generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    prompt: SoftPrompt | None = None,
    max_new_tokens: int = 16,
    stop_ids: set[int] | None = None,
    batch_size: int = 8,
) -> list[list[int]]:
    """Greedy continuations of each request (token ids) under one soft prompt; stop tokens are kept."""
    kv = prefix_kv(model, prompt)
    stops = stop_ids or set()
    out: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        out.extend(_greedy_batch(model, prompts[i : i + batch_size], prompt, kv, max_new_tokens, stops))
    return out


def serving_loss(model: Any, batch: Any, prompt: SoftPrompt | None) -> torch.Tensor:
    """Training-style loss of a plain batch ([request][answer] rows) computed through a serving form.

    Lets tests and evals check that what was trained is what the server will run.
    """
    from training.lm import add_delta, lm_loss

    device = model_device(model)
    B, T = batch.input_ids.shape
    tokens = embed_tokens(model, batch.input_ids)  # [B, T, d]
    if prompt is not None and prompt.added is not None:
        tokens = add_delta(tokens, prompt.added.to(device, tokens.dtype), batch.prompt_lengths)  # [B, T, d]
    kv = prefix_kv(model, prompt)
    m = 0 if kv is None else int(kv[0].shape[2])
    cache = None if kv is None else kv_cache(model, kv[0], kv[1], B)
    start = 0 if prompt is None else int(prompt.next_position)
    mask = torch.cat([torch.ones(B, m, dtype=torch.long), batch.attention_mask], dim=1).to(device)  # [B, m+T]
    positions = torch.arange(start, start + T, device=device)[None].expand(B, -1)  # [B, T]
    return lm_loss(model, tokens, mask, positions, batch.labels, cache=cache)
