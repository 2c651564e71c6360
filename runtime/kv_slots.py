"""Preallocated KV storage for the running batch: one slot per row, rows left-aligned in their slot.

Per layer, keys and values live in buffers [S, Hkv, C, Dh] (S slots, C columns per slot) allocated once.
Live rows occupy slots 0..B-1, each left-aligned: [KV prefix (m)][prompt (n)][generated ...], so a row's
column j is its j-th real token and the row holds `lengths[b]` columns. A decode step writes each row's new
key/value at its own column (`SlotLayer.update`) and attends over columns [0, max length] of slots 0..B-1,
with a mask that is 1 on each row's own columns.

Admission writes only the new rows' slots; a retirement moves at most one live row per freed slot (the last
live row fills the hole), so neither copies the rest of the batch. Columns that were never written hold
zeros: a watermark (`clean`) marks how far every slot has been zeroed, and columns are zeroed on all slots
before the batch first reads them (so masked columns are finite; 0 * NaN would leak into a softmax row).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

KV = tuple[torch.Tensor, torch.Tensor]
CLEAN_AHEAD = 64  # columns zeroed together when the batch first reaches them


def token_bytes(num_layers: int, shape: tuple[int, int], dtype: torch.dtype) -> int:
    """KV bytes of one token over all layers (keys and values)."""
    return 2 * num_layers * shape[0] * shape[1] * torch.empty((), dtype=dtype).element_size()


class SlotLayer(DynamicLayer):
    """One layer's view of slots `rows` for a decode step: live columns [0, width), each row appends one
    key/value at its own column `cols[b]` (its length), and the layer then shows columns [0, width + 1)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self._k, self._v = keys, values  # [S, Hkv, C, Dh] each
        self.device, self.is_initialized = keys.device, True
        self._span: slice | None = None  # the slots `_rk`, `_rv` show
        self._width = -1
        empty = keys.new_zeros(0, dtype=torch.long)  # [0]
        self.prepare(slice(0, 0), 0, empty, empty)

    def prepare(
        self, rows: slice, width: int, cols: torch.Tensor, slots: torch.Tensor, col: int | None = None
    ) -> None:
        """Set up the next decode step: slots `rows` (their indices `slots` [B]) with `width` live columns,
        row b writing at column cols[b]; `col`: the column every row writes at, when they all do."""
        self._slots, self._cols, self._col = slots, cols, col  # slots, cols [B] long
        if rows != self._span:  # the slots' views, kept while the rows stay
            self._span, self._rk, self._rv = rows, self._k[rows], self._v[rows]  # [B, Hkv, C, Dh] views
            self._show(width)
        elif width != self._width:  # (the last step's update already shows `width` columns, usually)
            self._show(width)

    def _show(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._width = width
        keys = self._rk.narrow(2, 0, width)  # [B, Hkv, W, Dh] view
        values = self._rv.narrow(2, 0, width)  # [B, Hkv, W, Dh] view
        self.keys, self.values = keys, values
        return keys, values

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """key/value states [B, Hkv, 1, Dh] -> the live keys and values [B, Hkv, W + 1, Dh]."""
        if key_states.shape[2] != 1:
            raise ValueError(f"a slot layer appends one column per step, got {key_states.shape[2]}")
        col = self._col
        if col is not None:  # one column for every row: a plain slice
            self._rk[:, :, col : col + 1] = key_states  # [B, Hkv, 1, Dh]
            self._rv[:, :, col : col + 1] = value_states  # [B, Hkv, 1, Dh]
        else:
            cols = self._cols.view(-1)  # [B]
            self._k[self._slots, :, cols] = key_states[:, :, 0]  # [B, Hkv, Dh] at (slot, col)
            self._v[self._slots, :, cols] = value_states[:, :, 0]  # [B, Hkv, Dh] at (slot, col)
        keys, values = self._show(self._width + 1)
        return keys, values


class KVSlots:
    """S slots of C columns for every layer; rows 0..B-1 are live (`lengths`, host-side)."""

    def __init__(
        self,
        num_layers: int,
        shape: tuple[int, int],  # (Hkv, Dh)
        slots: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        heads, dim = shape
        self.capacity = capacity
        # torch.empty: large buffers are mapped lazily by the OS; `clean` zeroes columns before first use.
        self.keys = [
            torch.empty(slots, heads, capacity, dim, dtype=dtype, device=device) for _ in range(num_layers)
        ]
        self.values = [
            torch.empty(slots, heads, capacity, dim, dtype=dtype, device=device) for _ in range(num_layers)
        ]  # [S, Hkv, C, Dh] each
        self.lengths: list[int] = []  # columns held by each live row
        self.slot_ids = torch.arange(slots, device=device)  # [S]
        self.columns = torch.arange(capacity, device=device)  # [C]
        self._no_index = torch.zeros(0, dtype=torch.long, device=device)  # [0]
        self.clean = 0  # columns [0, clean) of every slot are finite (written or zeroed)
        self.token_bytes = token_bytes(num_layers, shape, dtype)
        self.copied = {"admission": 0, "retirement": 0}  # bytes written/moved by each (cumulative)
        self._cache: DynamicCache | None = None  # the decode steps' view of the slots (decode_cache)
        self._layers: list[SlotLayer] = []  # its layers

    @property
    def slots(self) -> int:
        return int(self.keys[0].shape[0]) if self.keys else 0

    @property
    def size(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return max(self.lengths, default=0)

    @property
    def nbytes(self) -> int:
        return self.slots * self.capacity * self.token_bytes

    def ensure_clean(self, width: int) -> None:
        """Zero columns [clean, width) of every slot, CLEAN_AHEAD columns at a time (each column once over
        the buffers' life)."""
        if width <= self.clean:
            return
        end = min(self.capacity, max(width, self.clean + CLEAN_AHEAD))
        for k, v in zip(self.keys, self.values, strict=True):
            k[:, :, self.clean : end].zero_()  # [S, Hkv, w, Dh]
            v[:, :, self.clean : end].zero_()  # [S, Hkv, w, Dh]
        self.clean = end

    def write_rows(self, layers: list[KV], index: torch.Tensor, lengths: list[int]) -> None:
        """Append rows to slots B..B+G-1: per layer, source keys/values [G, Hkv, K, Dh] and the source column
        of each destination column, index [G, Hkv, Lmax, Dh] (long); row g holds `lengths[g]` columns."""
        start, count, span = self.size, len(lengths), int(index.shape[2])
        if start + count > self.slots:
            raise ValueError(f"{start + count} rows do not fit {self.slots} KV slots")
        if max(lengths, default=0) > self.capacity:
            raise ValueError(
                f"a row of {max(lengths)} columns does not fit the slot capacity {self.capacity}"
            )
        self.ensure_clean(span)
        for i, (keys, values) in enumerate(layers):
            self.keys[i][start : start + count, :, :span] = keys.gather(2, index)  # [G, Hkv, Lmax, Dh]
            self.values[i][start : start + count, :, :span] = values.gather(2, index)  # [G, Hkv, Lmax, Dh]
        self.lengths.extend(lengths)
        self.copied["admission"] += count * span * self.token_bytes

    def retire(self, finished: set[int]) -> list[int]:
        """Free the slots in `finished`; the last live rows fill the holes below the new size (one row's
        columns moved per hole). Returns, for each live slot afterwards, the slot its row came from."""
        size = self.size - len(finished)
        holes = sorted(s for s in finished if s < size)
        movers = [s for s in range(size, self.size) if s not in finished]
        source = list(range(size))
        if holes:
            span = max(self.lengths[s] for s in movers)
            dst = torch.tensor(holes, device=self.keys[0].device)  # [h]
            src = torch.tensor(movers, device=self.keys[0].device)  # [h]
            for k, v in zip(self.keys, self.values, strict=True):
                k[dst, :, :span] = k[src, :, :span]  # [h, Hkv, span, Dh]
                v[dst, :, :span] = v[src, :, :span]  # [h, Hkv, span, Dh]
            for h, s in zip(holes, movers, strict=True):
                source[h] = s
            self.copied["retirement"] += len(holes) * span * self.token_bytes
        self.lengths = [self.lengths[s] for s in source]
        return source

    def decode_cache(self, model_config: Any, rows: slice, cols: torch.Tensor) -> DynamicCache:
        """The cache over slots `rows` for one decode step: each row appends at column cols[b] (its length;
        cols [B] or [B, 1]).
        One DynamicCache of SlotLayers is built once and re-aimed at every step."""
        if self._cache is None:
            cache = DynamicCache(config=model_config)
            if len(cache.layers) != len(self.keys):
                raise ValueError(
                    f"the model has {len(cache.layers)} cache layers, the slots {len(self.keys)}"
                )
            self._layers = [SlotLayer(k, v) for k, v in zip(self.keys, self.values, strict=True)]
            cache.layers[:] = self._layers
            self._cache = cache
        lengths = self.lengths[rows]
        width = max(lengths, default=0)
        if lengths and min(lengths) == width:  # every row writes at one column: no index tensors
            col: int | None = width
            slots = cols = self._no_index
        else:
            col, slots = None, self.slot_ids[rows]  # [B]
        for layer in self._layers:
            layer.prepare(rows, width, cols, slots, col)
        return self._cache

    def grow(self, capacity: int) -> None:
        """More columns per slot (copies the live columns; for growable standalone batches only)."""
        old = self.capacity
        for i in range(len(self.keys)):
            for buffers in (self.keys, self.values):
                b = buffers[i]
                new = b.new_zeros(b.shape[0], b.shape[1], capacity, b.shape[3])  # [S, Hkv, C', Dh]
                new[:, :, : min(old, self.clean)] = b[:, :, : min(old, self.clean)]
                buffers[i] = new
        self.capacity = capacity
        self.columns = torch.arange(capacity, device=self.columns.device)  # [C]
        self.clean = capacity
        self._cache = None
