"""The running batch as tensors: KV slots, each row's next position, and the prefill/decode that run on them.

New rows are prefilled together in a forward of their own (`prefill_forward`: KV prefixes right-aligned,
prompts left-padded among the new rows only), then each row's real columns are gathered into its slot
(`BatchState.admit`): [KV prefix (m)][prompt (n)], left-aligned. A decode step feeds every live row its last
token (`decode_one_token`): each row writes one column at its own length and attends to its own columns.
Position ids are explicit per row (the prompt continues at the prefix's `next_position`), so a row's layout
never shifts its positions.

A failed forward shared by several rows is retried once for each row alone (`prefill_rows`, `decode_rows`),
so a failure that belongs to one row (its input, or memory for the whole batch) is attributed to it; a row
decoding alone rewrites only its own column, so no copy of the batch is needed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from runtime.kv_cache import SlackLayer, slack_cache
from runtime.kv_slots import KVSlots
from runtime.model_runner import ModelRunner, layer_kv


@dataclass
class PrefillItem:
    """One new row: its KV prefix, the position its prompt continues at, prompt ids and optional delta."""

    keys: torch.Tensor  # [L, Hkv, m, Dh]
    values: torch.Tensor  # [L, Hkv, m, Dh]
    next_position: int
    ids: list[int]
    added: torch.Tensor | None = None  # [s, d] added to s prompt-token embeddings from `added_at` on
    added_at: int = 0  # index in `ids` of the delta's first token (the user text's: runtime.input_format)

    @property
    def prefix_len(self) -> int:
        return int(self.keys.shape[2])

    @property
    def length(self) -> int:
        """KV columns the row holds after its prefill (prefix + prompt)."""
        return self.prefix_len + len(self.ids)


@dataclass
class Prefilled:
    """New rows after their prefill forward: the forward's cache (per layer [G, Hkv, M + N, Dh], prefixes
    right-aligned in M columns, prompts in the last N) and what each row needs in its slot."""

    cache: DynamicCache
    prefix_lens: list[int]  # m_g
    prompt_lens: list[int]  # n_g
    prefix_width: int  # M
    next_positions: list[int]  # position id of each row's next input token


class BatchState:
    """Live rows in KV slots (`kv`) and the position id of each row's next input token (`positions`)."""

    def __init__(self, runner: ModelRunner, slots: int, capacity: int, growable: bool = False) -> None:
        layers = len(DynamicCache(config=runner.model.config).layers)
        shape = (runner.num_kv_heads, runner.head_dim)
        self.kv = KVSlots(layers, shape, slots, capacity, runner.dtype, runner.device)
        embedding = runner.model.get_input_embeddings()
        self.embed: Callable[[torch.Tensor], torch.Tensor] = embedding  # ids [..., n] -> [..., n, d]
        plain = type(embedding) is torch.nn.Embedding and "forward" not in vars(embedding)  # not wrapped
        hooked = plain and bool(embedding._forward_hooks or embedding._forward_pre_hooks)
        if plain and not hooked and embedding.max_norm is None:  # its forward, without the module call:
            weight = embedding.weight  # [V, d]
            self.embed = lambda ids: torch.nn.functional.embedding(ids, weight)  # [..., n, d]
        self.positions: list[int] = []
        self.growable = growable  # standalone batches grow their columns; the engine's never do

    @property
    def size(self) -> int:
        return self.kv.size

    @property
    def lengths(self) -> list[int]:
        return self.kv.lengths

    def admit(self, new: Prefilled, keep: list[int]) -> None:
        """Gather rows `keep` of `new` (their prefix and prompt columns only) into the next free slots."""
        prefix_lens = [new.prefix_lens[g] for g in keep]
        prompt_lens = [new.prompt_lens[g] for g in keep]
        widths = [m + n for m, n in zip(prefix_lens, prompt_lens, strict=True)]
        span = max(widths)
        M = new.prefix_width
        layers = [layer_kv(new.cache, i) for i in range(len(new.cache.layers))]  # [G, Hkv, M + N, Dh] each
        keys0 = layers[0][0]
        total = int(keys0.shape[2])  # M + N
        index = torch.zeros(len(keep), span, dtype=torch.long)  # [G', Lmax]: source column of each column
        for g, (m, n) in enumerate(zip(prefix_lens, prompt_lens, strict=True)):
            index[g, :m] = torch.arange(M - m, M)  # [m]
            index[g, m : m + n] = torch.arange(total - n, total)  # [n]
        index = index.to(keys0.device)[:, None, :, None].expand(-1, keys0.shape[1], -1, keys0.shape[3])
        # index [G', Hkv, Lmax, Dh]
        if len(keep) < int(keys0.shape[0]):
            rows = torch.tensor(keep, dtype=torch.long, device=keys0.device)  # [G']
            layers = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in layers]  # [G', ...] each
        if self.growable and span > self.kv.capacity:
            self.kv.grow(span)
        self.kv.write_rows(layers, index, widths)
        self.positions.extend(new.next_positions[g] for g in keep)

    def retire(self, finished: set[int]) -> list[int]:
        """Free rows `finished`; returns for each remaining row (new order) the row index it had before."""
        source = self.kv.retire(finished)
        self.positions = [self.positions[s] for s in source]
        return source


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
            start = width - len(it.ids) + it.added_at
            s = max(0, min(int(it.added.shape[0]), len(it.ids) - it.added_at))
            embeds[b, start : start + s] = embeds[b, start : start + s] + it.added[:s]  # [s, d]
    return embeds


@torch.inference_mode()
def prefill_forward(runner: ModelRunner, items: list[PrefillItem]) -> tuple[Prefilled, torch.Tensor]:
    """Run new rows (KV prefix + prompt) in one forward of their own; returns them and last logits [G, V]."""
    device = runner.device
    prefix_width = max(it.prefix_len for it in items)  # M
    width = max(len(it.ids) for it in items)  # N
    cache = _padded_prefix(runner, items, prefix_width, spare=width)
    embeds = _prompt_embeds(runner, items, width)  # [G, N, d]
    mask = torch.zeros(len(items), prefix_width + width, dtype=torch.long)  # [G, M + N]
    positions = torch.zeros(len(items), width, dtype=torch.long)  # [G, N]
    for b, it in enumerate(items):
        n = len(it.ids)
        mask[b, prefix_width - it.prefix_len : prefix_width] = 1
        mask[b, prefix_width + width - n :] = 1
        positions[b, width - n :] = torch.arange(it.next_position, it.next_position + n)  # [n]
    logits = runner.forward(embeds, mask.to(device), positions.to(device), cache)  # [G, V]
    new = Prefilled(
        cache,
        [it.prefix_len for it in items],
        [len(it.ids) for it in items],
        prefix_width,
        [it.next_position + len(it.ids) for it in items],
    )
    return new, logits


@torch.inference_mode()
def prefill(
    runner: ModelRunner, items: list[PrefillItem], capacity: int | None = None
) -> tuple[BatchState, torch.Tensor]:
    """New rows in a standalone batch of their own (slots that grow as the rows do); logits [G, V]."""
    new, logits = prefill_forward(runner, items)
    width = max(it.length for it in items)
    state = BatchState(runner, len(items), capacity or width + 64, growable=True)
    state.admit(new, list(range(len(items))))
    return state, logits


@torch.inference_mode()
def decode_one_token(
    runner: ModelRunner, state: BatchState, tokens: list[int], rows: slice | None = None
) -> torch.Tensor:
    """Feed each live row (or rows `rows`) its last token: one column per row; returns logits [B, V]."""
    rows = rows or slice(0, state.size)
    lengths = state.lengths[rows]
    width = max(lengths) + 1  # W: columns read by this step
    if width > state.kv.capacity:
        if not state.growable:
            raise ValueError(f"a row of {width} columns does not fit the slot capacity {state.kv.capacity}")
        state.kv.grow(max(width, 2 * state.kv.capacity))
    state.kv.ensure_clean(width)
    positions = state.positions[rows]
    host = torch.tensor(lengths + positions + tokens, dtype=torch.long)  # [3B]: one host -> device copy
    cols, pos, ids = host.to(runner.device).view(3, -1, 1).unbind(0)  # [B, 1] each
    embeds = state.embed(ids)  # [B, 1, d]
    mask = state.kv.columns[:width] <= cols  # [B, W] bool: each row's own columns
    cache = state.kv.decode_cache(runner.model.config, rows, cols)
    logits = runner.forward(embeds, mask, pos, cache, query_cols=cols)  # [B, V]
    state.kv.lengths[rows] = [n + 1 for n in lengths]
    state.positions[rows] = [p + 1 for p in positions]
    return logits


@dataclass
class Forward:
    """A forward over some rows, every failure attributed: the rows that ran (`ran`, indices into the input
    rows, in order) with their last logits [len(ran), V], and the rows whose forward failed. A prefill also
    gives the new rows' states (`parts`, in `ran` order)."""

    logits: torch.Tensor | None  # [len(ran), V]
    ran: list[int]
    failed: dict[int, Exception]  # row index -> the failure of its own forward
    shared_error: Exception | None = None  # the failed forward of all rows together, if any
    parts: list[tuple[Prefilled, int]] | None = None  # prefill: each ran row's forward and its index there

    @property
    def errors(self) -> int:
        """Forwards that failed (the shared one and each row's own)."""
        return len(self.failed) + (self.shared_error is not None)


def prefill_rows(runner: ModelRunner, items: list[PrefillItem]) -> Forward:
    """New rows in one forward; if it fails and there are several, each row is prefilled alone once."""
    try:
        new, logits = prefill_forward(runner, items)  # logits [G, V]
        return Forward(logits, list(range(len(items))), {}, parts=[(new, g) for g in range(len(items))])
    except Exception as exc:
        if len(items) == 1:
            return Forward(None, [], {0: exc})
        shared = exc
    parts: list[tuple[Prefilled, int]] = []

    def alone(i: int) -> torch.Tensor:
        new, logits = prefill_forward(runner, [items[i]])  # [1, V]
        parts.append((new, 0))
        return logits

    out = _each_alone(len(items), alone, shared)
    out.parts = parts
    return out


def decode_rows(runner: ModelRunner, state: BatchState, tokens: list[int]) -> Forward:
    """One decode step of every row; if the shared forward fails, each row decodes once alone (its own
    column is written again, whatever the failed forward left there). Rows that fail keep their length."""
    lengths, positions = list(state.kv.lengths), list(state.positions)
    try:
        logits = decode_one_token(runner, state, tokens)  # [B, V]
        return Forward(logits, list(range(len(tokens))), {})
    except Exception as exc:
        state.kv.lengths[:], state.positions[:] = lengths, positions
        if len(tokens) == 1:
            return Forward(None, [], {0: exc})
        shared = exc

    def alone(i: int) -> torch.Tensor:
        return decode_one_token(runner, state, [tokens[i]], rows=slice(i, i + 1))  # [1, V]

    return _each_alone(len(tokens), alone, shared)


def _each_alone(n: int, run: Callable[[int], torch.Tensor], shared: Exception) -> Forward:
    """Rows 0..n-1 each in a forward of its own."""
    ran: list[int] = []
    logits: list[torch.Tensor] = []
    failed: dict[int, Exception] = {}
    for i in range(n):
        try:
            out = run(i)  # [1, V]
        except Exception as exc:
            failed[i] = exc
            continue
        ran.append(i)
        logits.append(out)
    return Forward(torch.cat(logits) if logits else None, ran, failed, shared)  # logits [B', V]
