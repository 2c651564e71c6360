"""Training forwards (gradients flow into the trained inputs): token embeddings, masked LM loss, KV-prefix
caches, gist masks. Inference forwards (prefix -> KV, prefill/decode, gist compression) are `runtime/`'s."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from training.data import IGNORE, Batch


def model_dtype(model: Any) -> torch.dtype:
    return next(model.parameters()).dtype


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def embed_tokens(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """ids [B, T] -> input embeddings [B, T, d] (no grad: the embedding matrix is frozen)."""
    emb: torch.Tensor = model.get_input_embeddings()(ids.to(model_device(model)))  # [B, T, d]
    return emb


def kv_cache(model: Any, keys: torch.Tensor, values: torch.Tensor, batch: int) -> DynamicCache:
    """A cache holding one KV prefix per layer, broadcast over the batch.

    keys/values [L, Hkv, m, Dh] -> layers of [B, Hkv, m, Dh]; gradients flow back into keys/values.
    """
    dtype, device = model_dtype(model), model_device(model)
    layers = [
        (
            k.to(device, dtype)[None].expand(batch, -1, -1, -1),  # [B, Hkv, m, Dh]
            v.to(device, dtype)[None].expand(batch, -1, -1, -1),  # [B, Hkv, m, Dh]
        )
        for k, v in zip(keys, values, strict=True)
    ]
    return DynamicCache(ddp_cache_data=layers, config=model.config)


def lm_loss(
    model: Any,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    labels: torch.Tensor,
    cache: DynamicCache | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions.

    embeds [B, T, d]; attention_mask [B, P + T] (2D, P = cache length) or an additive [B, 1, T, T] float
    mask; position_ids [B, T]; labels [B, T] (-100 = no loss). The LM head runs on labelled positions only.
    """
    out = model.base_model(
        inputs_embeds=embeds.to(model_dtype(model)),  # [B, T, d]
        attention_mask=attention_mask,
        position_ids=position_ids,  # [B, T]
        cache=cache,
        use_cache=cache is not None,
    )
    hidden = out.last_hidden_state[:, :-1]  # [B, T-1, d]
    targets = labels[:, 1:].to(hidden.device)  # [B, T-1]
    keep = targets != IGNORE  # [B, T-1]
    logits = model.get_output_embeddings()(hidden[keep])  # [N, V]
    return F.cross_entropy(logits.float(), targets[keep])


def add_delta(
    embeds: torch.Tensor,
    added: torch.Tensor,
    prompt_lengths: torch.Tensor,
    added_at: torch.Tensor | None = None,
) -> torch.Tensor:
    """ACCEPT SCAP: add added[i] to token added_at + i of each row, on that row's request tokens only (the
    server's placement: runtime.batch_state.PrefillItem.added_at; added_at None = 0, the request's start).

    embeds [B, T, d] (right-padded rows starting at 0); added [s, d]; prompt_lengths [B]; added_at [B].
    """
    B, T, d = embeds.shape
    device = embeds.device
    s = int(added.shape[0])
    at = torch.zeros(B, dtype=torch.long) if added_at is None else added_at  # [B]
    cols = torch.arange(T, device=device)[None]  # [1, T]
    row = cols - at.to(device)[:, None]  # [B, T]: delta row of each column
    inside = (row >= 0) & (row < s) & (cols < prompt_lengths.to(device)[:, None])  # [B, T]
    delta = added.to(embeds.dtype)[row.clamp(0, s - 1)]  # [B, T, d]
    return embeds + delta * inside[..., None].to(embeds.dtype)  # [B, T, d]


def prompt_prefix_loss(
    model: Any, batch: Batch, prompt: torch.Tensor, added: torch.Tensor | None = None
) -> torch.Tensor:
    """Loss with an embedding prefix: [prompt ; tokens], positions 0.., mask covering both.

    prompt [m, d]; added [s, d] (optional delta on the first s request tokens).
    """
    device = model_device(model)
    tokens = embed_tokens(model, batch.input_ids).float()  # [B, T, d]
    if added is not None:
        tokens = add_delta(tokens, added, batch.prompt_lengths, batch.added_at)  # [B, T, d]
    B, T, _ = tokens.shape
    m = prompt.shape[0]
    embeds = torch.cat([prompt[None].expand(B, -1, -1).to(tokens.dtype), tokens], dim=1)  # [B, m+T, d]
    mask = torch.cat([torch.ones(B, m, dtype=torch.long), batch.attention_mask], dim=1).to(device)  # [B, m+T]
    positions = torch.arange(m + T, device=device)[None].expand(B, -1)  # [B, m+T]
    labels = torch.cat([torch.full((B, m), IGNORE, dtype=torch.long), batch.labels], dim=1)  # [B, m+T]
    return lm_loss(model, embeds, mask, positions, labels)


def kv_prefix_loss(model: Any, batch: Batch, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Loss with a KV prefix keys/values [L, Hkv, m, Dh]: input positions continue at m, mask covers both."""
    device = model_device(model)
    B, T = batch.input_ids.shape
    m = keys.shape[2]
    cache = kv_cache(model, keys, values, B)
    tokens = embed_tokens(model, batch.input_ids)  # [B, T, d]
    mask = torch.cat([torch.ones(B, m, dtype=torch.long), batch.attention_mask], dim=1).to(device)  # [B, m+T]
    positions = torch.arange(m, m + T, device=device)[None].expand(B, -1)  # [B, T]
    return lm_loss(model, tokens, mask, positions, batch.labels, cache=cache)


def gist_allowed(lengths: torch.Tensor, gist_start: torch.Tensor, num_gist: int, width: int) -> torch.Tensor:
    """Boolean gist attention pattern [B, T, T] (query i, key j), T = width.

    Causal, keys limited to each row's real tokens; queries after the gists (i >= start + k) do not see the
    instruction (j < start). Padding queries see themselves only, so no row is fully masked.
    """
    i = torch.arange(width)[None, :, None]  # [1, T, 1]
    j = torch.arange(width)[None, None, :]  # [1, 1, T]
    start = gist_start[:, None, None]  # [B, 1, 1]
    real = j < lengths[:, None, None]  # [B, 1, T]
    after_gists = i >= start + num_gist  # [B, T, 1]
    instruction_key = j < start  # [B, 1, T]
    allowed = (j <= i) & real & ~(after_gists & instruction_key)  # [B, T, T]
    return allowed | (i == j)  # [B, T, T]


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean [B, T, T] -> additive float mask [B, 1, T, T]: 0 where allowed, the dtype's min elsewhere."""
    zero = torch.zeros((), dtype=dtype)
    neg = torch.tensor(torch.finfo(dtype).min, dtype=dtype)
    return torch.where(allowed, zero, neg)[:, None]  # [B, 1, T, T]
