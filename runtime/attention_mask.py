"""Attention masks for sliding-window and hybrid (sliding + global) models over the engine's padded layout.

The engine keeps every layer's full KV cache, left-padded per row (see runtime/batch_state.py), so a cache
column is not a token's place in its sequence. Hugging Face builds sliding masks on cache columns (a query at
column q sees keys at columns k with q - window < k <= q, `masking_utils.sliding_window_overlay`), which for
the reference (one unpadded row: [KV prefix][prompt][generated]) are the row's real columns counted from 0. So
here a column's index is its rank among the row's real columns (cumsum of the 2D mask - 1), and the model gets
a 4D mask per layer type: padding, causality and, on sliding layers, the window, all in those ranks.
Full-attention-only models are left alone (the 2D mask goes to the model as before).
"""

from __future__ import annotations

from typing import Any

import torch

FULL, SLIDING = "full_attention", "sliding_attention"


def layer_types(config: Any) -> list[str]:
    """Each decoder layer's attention kind: the config's `layer_types`, else all sliding when
    `sliding_window` is set (Mistral), else all full."""
    types = getattr(config, "layer_types", None)
    if types:
        return [str(t) for t in types]
    kind = SLIDING if getattr(config, "sliding_window", None) else FULL
    return [kind] * int(config.num_hidden_layers)


class WindowMasks:
    """Builds the `attention_mask` argument for a model with sliding-window layers."""

    def __init__(self, config: Any, attn_implementation: str, dtype: torch.dtype) -> None:
        types = layer_types(config)
        unknown = set(types) - {FULL, SLIDING}
        if unknown:
            raise NotImplementedError(
                f"attention layer types {sorted(unknown)} are not supported by the engine"
            )
        if attn_implementation not in ("sdpa", "eager"):
            raise NotImplementedError(
                f"attention implementation {attn_implementation!r} is not supported with sliding-window "
                "layers (use sdpa or eager)"
            )
        self.window = int(config.sliding_window)
        self.kinds = sorted(set(types))
        self.eager = attn_implementation == "eager"
        self.dtype = dtype
        # Models whose layers are all sliding and that take no per-type dict (Mistral) get one 4D tensor.
        self.as_dict = self.kinds != [SLIDING] or getattr(config, "layer_types", None) is not None

    @staticmethod
    def needed(config: Any) -> bool:
        return getattr(config, "sliding_window", None) is not None and SLIDING in layer_types(config)

    def build(
        self, mask: torch.Tensor, n: int, query_cols: torch.Tensor | None = None
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """mask [B, K] (1 on real columns) -> 4D mask(s) [B, 1, n, K]; the queries are the last n columns,
        or columns `query_cols` [B, n] of each row (the slot layout: a row's new token sits at its length)."""
        width = mask.shape[1]
        real = mask.bool()  # [B, K]
        rank = mask.long().cumsum(1) - 1  # [B, K]: index among the row's real columns
        if query_cols is None:
            query_cols = torch.arange(width - n, width, device=mask.device)[None].expand(mask.shape[0], -1)
        q_rank = rank.gather(1, query_cols)[:, :, None]  # [B, n, 1]
        k_rank = rank[:, None, :]  # [B, 1, K]
        # A padding query sees itself, so no softmax row is empty (its output is never attended to).
        own = torch.arange(width, device=mask.device)[None, None, :] == query_cols[:, :, None]  # [B, n, K]
        causal = (real[:, None, :] & (k_rank <= q_rank)) | own  # [B, n, K]
        sliding = (causal & (k_rank > q_rank - self.window)) | own  # [B, n, K]
        masks = {FULL: causal, SLIDING: sliding}
        out = {kind: self._format(masks[kind][:, None]) for kind in self.kinds}  # [B, 1, n, K] each
        return out if self.as_dict else out[SLIDING]

    def _format(self, allowed: torch.Tensor) -> torch.Tensor:
        """bool [B, 1, n, K] -> what HF's own mask builder gives this implementation (sdpa: bool; eager:
        0 / dtype-min additive)."""
        if not self.eager:
            return allowed
        zero = torch.zeros((), dtype=self.dtype, device=allowed.device)
        low = torch.tensor(torch.finfo(self.dtype).min, dtype=self.dtype, device=allowed.device)
        return torch.where(allowed, zero, low)  # [B, 1, n, K]
