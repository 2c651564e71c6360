"""A cache layer for the running batch: keys/values live in buffers with spare columns.

transformers' DynamicLayer appends by `torch.cat`, copying every layer's whole cache at every decode step.
SlackLayer writes the new column in place and exposes views, so a step copies only what it adds (bit-identical
results; ~20 % faster decode at 512 cached columns on CPU). Dropping leading columns is a view change too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

SPARE_COLUMNS = 64


class SlackLayer(DynamicLayer):
    """Columns [start, end) of buffers [B, Hkv, capacity, Dh] hold the live keys and values."""

    def __init__(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, end: int) -> None:
        super().__init__()
        self._k, self._v = key_buffer, value_buffer  # [B, Hkv, capacity, Dh] each
        self._start, self._end = 0, end
        self.device, self.is_initialized = key_buffer.device, True
        self._refresh()

    @classmethod
    def right_aligned(
        cls,
        keys: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
        length: int,
        spare: int = SPARE_COLUMNS,
    ) -> SlackLayer:
        """Stack row groups [b_i, Hkv, t_i, Dh] along the batch, each right-aligned to `length`."""
        rows = sum(k.shape[0] for k in keys)
        _, heads, _, dim = keys[0].shape
        key_buffer = keys[0].new_zeros(rows, heads, length + spare, dim)  # [B, Hkv, T + spare, Dh]
        value_buffer = values[0].new_zeros(rows, heads, length + spare, dim)  # [B, Hkv, T + spare, Dh]
        row = 0
        for k, v in zip(keys, values, strict=True):
            b, t = k.shape[0], k.shape[2]
            key_buffer[row : row + b, :, length - t : length] = k  # [b, Hkv, t, Dh]
            value_buffer[row : row + b, :, length - t : length] = v  # [b, Hkv, t, Dh]
            row += b
        return cls(key_buffer, value_buffer, length)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append key/value states [B, Hkv, n, Dh]; returns the live keys and values [B, Hkv, T + n, Dh]."""
        n = key_states.shape[2]
        if self._end + n > self._k.shape[2]:
            self._grow(n)
        self._k[:, :, self._end : self._end + n] = key_states  # [B, Hkv, n, Dh]
        self._v[:, :, self._end : self._end + n] = value_states  # [B, Hkv, n, Dh]
        self._end += n
        return self._refresh()

    def drop_front(self, n: int) -> None:
        """Forget the first n live columns (no copy)."""
        self._start = min(self._start + n, self._end)
        self._refresh()

    def _grow(self, n: int) -> None:
        live = self._end - self._start
        capacity = live + max(n, live // 2, SPARE_COLUMNS)
        key_buffer = self._k.new_zeros(self._k.shape[0], self._k.shape[1], capacity, self._k.shape[3])
        value_buffer = self._v.new_zeros(self._v.shape[0], self._v.shape[1], capacity, self._v.shape[3])
        keys, values = self._refresh()  # [B, Hkv, T, Dh] each
        key_buffer[:, :, :live] = keys  # [B, Hkv, T, Dh]
        value_buffer[:, :, :live] = values  # [B, Hkv, T, Dh]
        self._k, self._v, self._start, self._end = key_buffer, value_buffer, 0, live

    def _refresh(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self._k[:, :, self._start : self._end]  # [B, Hkv, T, Dh] view
        values = self._v[:, :, self._start : self._end]  # [B, Hkv, T, Dh] view
        self.keys, self.values = keys, values
        return keys, values


def slack_cache(model_config: Any, layers: list[SlackLayer]) -> DynamicCache:
    """A DynamicCache whose layers are SlackLayers (full attention only)."""
    cache = DynamicCache(config=model_config)
    if len(cache.layers) != len(layers):
        raise ValueError(f"the model has {len(cache.layers)} cache layers, got {len(layers)}")
    for i, layer in enumerate(layers):
        cache.layers[i] = layer
    return cache
