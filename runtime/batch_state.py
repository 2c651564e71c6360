"""The running batch as tensors: a left-padded KV cache, its attention mask and each row's next position.

Layout of one row (columns of the cache, left to right):
    [pad ...][KV prefix (m)][pad ...][prompt tokens (n)][generated tokens ...]
The attention mask is 1 exactly on the prefix, prompt and generated columns; position ids are explicit per row
(the prompt continues at the prefix's `next_position`), so padding never shifts a row's positions.

A failed forward shared by several rows is retried once for each row alone (`prefill_rows`, `decode_rows`),
so a failure that belongs to one row (its input, or memory for the whole batch) is attributed to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from runtime.kv_cache import SPARE_COLUMNS, SlackLayer, slack_cache
from runtime.model_runner import KV, ModelRunner, layer_kv


@dataclass
class PrefillItem:
    """One new row: its KV prefix, the position its prompt continues at, prompt ids and optional delta."""

    keys: torch.Tensor  # [L, Hkv, m, Dh]
    values: torch.Tensor  # [L, Hkv, m, Dh]
    next_position: int
    ids: list[int]
    added: torch.Tensor | None = None  # [s, d] added to the first s prompt-token embeddings

    @property
    def prefix_len(self) -> int:
        return int(self.keys.shape[2])


def left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zero-pad `t` on the left of `dim` up to `length`."""
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [missing, 0]
    return F.pad(t, pad)


class BatchState:
    """Running rows: KV cache (per layer [B, Hkv, T, Dh]), attention mask [B, T], next positions [B]."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor) -> None:
        self.cache = cache  # layers are SlackLayers: decode steps append in place
        self.mask = mask  # [B, T] long
        self.positions = positions  # [B] long: position id of each row's next input token

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def layers(self) -> list[KV]:
        """Per-layer (keys, values), each [B, Hkv, T, Dh]."""
        return [layer_kv(self.cache, i) for i in range(len(self.cache.layers))]

    def select(self, keep: list[int]) -> None:
        """Keep only rows `keep` (in that order)."""
        idx = torch.tensor(keep, dtype=torch.long, device=self.mask.device)  # [B']
        for i, (keys, values) in enumerate(self.layers()):
            kept_k, kept_v = keys.index_select(0, idx), values.index_select(0, idx)  # [B', Hkv, T, Dh] each
            self.cache.layers[i] = SlackLayer.right_aligned([kept_k], [kept_v], self.length)
        self.mask = self.mask.index_select(0, idx)  # [B', T]
        self.positions = self.positions.index_select(0, idx)  # [B']

    def row(self, i: int, model_config: Any) -> BatchState:
        """A copy of row i alone, as of the last completed step: the first `length` live columns of every
        layer (a forward that failed midway may have appended a column to some layers; it is left out)."""
        t = self.length
        layers = [
            SlackLayer.right_aligned([k[i : i + 1, :, :t]], [v[i : i + 1, :, :t]], t)  # [1, Hkv, T, Dh] each
            for k, v in self.layers()
        ]
        mask = self.mask[i : i + 1].clone()  # [1, T]
        positions = self.positions[i : i + 1].clone()  # [1]
        return BatchState(slack_cache(model_config, layers), mask, positions)

    def trim(self) -> None:
        """Drop leading columns that are padding in every row (a view change, no copy)."""
        used = self.mask.any(dim=0)  # [T]
        first = int(torch.argmax(used.to(torch.int8))) if bool(used.any()) else self.length
        if first == 0:
            return
        for layer in self.cache.layers:
            assert isinstance(layer, SlackLayer)
            layer.drop_front(first)  # keys/values [B, Hkv, T - first, Dh]
        self.mask = self.mask[:, first:]  # [B, T - first]

    def merge(self, other: BatchState) -> None:
        """Append `other`'s rows after this batch's rows, left-padding both to a common length."""
        length = max(self.length, other.length)
        for i, ((k1, v1), (k2, v2)) in enumerate(zip(self.layers(), other.layers(), strict=True)):
            self.cache.layers[i] = SlackLayer.right_aligned([k1, k2], [v1, v2], length)  # [B+G, Hkv, T, Dh]
        self.mask = torch.cat([left_pad(self.mask, length, 1), left_pad(other.mask, length, 1)])  # [B+G, T]
        self.positions = torch.cat([self.positions, other.positions])  # [B+G]


def _padded_prefix(runner: ModelRunner, items: list[PrefillItem], width: int, spare: int) -> DynamicCache:
    """Per-row KV prefixes right-aligned in `width` columns: layers [G, Hkv, width (+ spare), Dh]."""
    layers = []
    for i in range(runner.num_layers):
        keys = [it.keys[i][None] for it in items]  # [1, Hkv, m, Dh] each
        values = [it.values[i][None] for it in items]  # [1, Hkv, m, Dh] each
        layers.append(SlackLayer.right_aligned(keys, values, width, spare))
    return slack_cache(runner.model.config, layers)


def _prompt_embeds(runner: ModelRunner, items: list[PrefillItem], width: int) -> torch.Tensor:
    """Left-padded prompt embeddings [G, N, d], with each ACCEPT delta on its row's first s real tokens."""
    ids = torch.full((len(items), width), runner.pad_id, dtype=torch.long)  # [G, N]
    for b, it in enumerate(items):
        ids[b, width - len(it.ids) :] = torch.tensor(it.ids, dtype=torch.long)
    embeds = runner.embed(ids)  # [G, N, d]
    for b, it in enumerate(items):
        if it.added is not None:
            start = width - len(it.ids)
            s = min(int(it.added.shape[0]), len(it.ids))
            embeds[b, start : start + s] = embeds[b, start : start + s] + it.added[:s]  # [s, d]
    return embeds


@torch.inference_mode()
def prefill(runner: ModelRunner, items: list[PrefillItem]) -> tuple[BatchState, torch.Tensor]:
    """Run new rows (KV prefix + prompt) in one forward; returns their state and last logits [G, V]."""
    device = runner.device
    prefix_width = max(it.prefix_len for it in items)  # M
    width = max(len(it.ids) for it in items)  # N
    cache = _padded_prefix(runner, items, prefix_width, spare=width + SPARE_COLUMNS)
    embeds = _prompt_embeds(runner, items, width)  # [G, N, d]
    mask = torch.zeros(len(items), prefix_width + width, dtype=torch.long)  # [G, M + N]
    positions = torch.zeros(len(items), width, dtype=torch.long)  # [G, N]
    for b, it in enumerate(items):
        n = len(it.ids)
        mask[b, prefix_width - it.prefix_len : prefix_width] = 1
        mask[b, prefix_width + width - n :] = 1
        positions[b, width - n :] = torch.arange(it.next_position, it.next_position + n)  # [n]
    mask, positions = mask.to(device), positions.to(device)
    logits = runner.forward(embeds, mask, positions, cache)  # [G, V]
    next_positions = positions[:, -1] + 1  # [G]
    return BatchState(cache, mask, next_positions), logits


@torch.inference_mode()
def decode_one_token(runner: ModelRunner, state: BatchState, tokens: list[int]) -> torch.Tensor:
    """Feed each row's last token; extends the state by one column and returns logits [B, V]."""
    device = runner.device
    ids = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]  # [B, 1]
    embeds = runner.embed(ids)  # [B, 1, d]
    ones = torch.ones(state.size, 1, dtype=torch.long, device=device)  # [B, 1]
    mask = torch.cat([state.mask, ones], dim=1)  # [B, T + 1]
    logits = runner.forward(embeds, mask, state.positions[:, None], state.cache)  # [B, V]
    state.mask = mask
    state.positions = state.positions + 1  # [B]
    return logits


@dataclass
class Forward:
    """A forward over some rows, every failure attributed: the rows that ran (`ran`, indices into the input
    rows, in order) with their state and last logits [len(ran), V], and the rows whose forward failed."""

    state: BatchState | None
    logits: torch.Tensor | None  # [len(ran), V]
    ran: list[int]
    failed: dict[int, Exception]  # row index -> the failure of its own forward
    shared_error: Exception | None = None  # the failed forward of all rows together, if any

    @property
    def errors(self) -> int:
        """Forwards that failed (the shared one and each row's own)."""
        return len(self.failed) + (self.shared_error is not None)


def prefill_rows(runner: ModelRunner, items: list[PrefillItem]) -> Forward:
    """New rows in one forward; if it fails and there are several, each row is prefilled alone once."""
    try:
        state, logits = prefill(runner, items)  # logits [G, V]
        return Forward(state, logits, list(range(len(items))), {})
    except Exception as exc:
        if len(items) == 1:
            return Forward(None, None, [], {0: exc})
        return _each_alone(len(items), lambda i: prefill(runner, [items[i]]), exc)


def decode_rows(runner: ModelRunner, state: BatchState, tokens: list[int]) -> Forward:
    """One decode step of every row; if the shared forward fails, each row decodes once alone from its own
    copy of the cache as of the last completed step (the failed forward may have written some layers)."""
    try:
        logits = decode_one_token(runner, state, tokens)  # [B, V]
        return Forward(state, logits, list(range(len(tokens))), {})
    except Exception as exc:
        if len(tokens) == 1:
            return Forward(None, None, [], {0: exc})
        shared = exc

    def alone(i: int) -> tuple[BatchState, torch.Tensor]:
        single = state.row(i, runner.model.config)
        return single, decode_one_token(runner, single, [tokens[i]])  # [1, V]

    return _each_alone(len(tokens), alone, shared)


def _each_alone(n: int, run: Callable[[int], tuple[BatchState, torch.Tensor]], shared: Exception) -> Forward:
    """Rows 0..n-1 each in a forward of its own; the ones that ran merged into one state, in order."""
    merged: BatchState | None = None
    ran: list[int] = []
    logits: list[torch.Tensor] = []
    failed: dict[int, Exception] = {}
    for i in range(n):
        try:
            state, out = run(i)  # out [1, V]
        except Exception as exc:
            failed[i] = exc
            continue
        if merged is None:
            merged = state
        else:
            merged.merge(state)
        ran.append(i)
        logits.append(out)
    return Forward(merged, torch.cat(logits) if logits else None, ran, failed, shared)  # logits [B', V]
