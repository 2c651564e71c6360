"""FLOPs of a model forward, counted (torch FlopCounterMode, with SDPA) and analytic; KV cache bytes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from runtime.model_runner import ModelRunner


def _sdpa_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """Q K^T and P V over every query x key pair (as torch's own formula; GQA: query heads count)."""
    b, h, s_q, d = query  # [B, H, S_q, Dh]
    s_k, d_v = key[-2], value[-1]  # key [B, Hkv, S_k, Dh], value [B, Hkv, S_k, Dv]
    return 2 * b * h * s_q * s_k * d + 2 * b * h * s_q * s_k * d_v


# FlopCounterMode has no formula for the SDPA op the CPU runs (it would count 0 attention FLOPs). It looks an
# op up twice: the overload decides "count here, do not decompose", the overload packet picks the formula.
_SDPA = torch.ops.aten.scaled_dot_product_attention
SDPA_FLOPS = {_SDPA: _sdpa_flops, _SDPA.default: _sdpa_flops}


def count_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """Total FLOPs of fn() and the per-operator split."""
    with FlopCounterMode(display=False, custom_mapping=SDPA_FLOPS) as counter:
        fn()
    per_op = {str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    return int(counter.get_total_flops()), per_op


def analytic_flops(runner: ModelRunner, tokens: int) -> int:
    """2 x non-embedding params x tokens + the LM head on the last position (logits_to_keep=1)."""
    params = sum(p.numel() for p in runner.model.parameters())
    vocab, d = runner.model.get_input_embeddings().weight.shape
    tied = bool(getattr(runner.model.config, "tie_word_embeddings", False))
    body = params - vocab * d * (1 if tied else 2)
    return 2 * body * tokens + 2 * d * vocab


def kv_bytes(runner: ModelRunner, positions: int) -> int:
    """Keys + values of `positions` cached positions over every layer, in the runner's dtype."""
    elem = torch.empty((), dtype=runner.dtype).element_size()
    return 2 * runner.num_layers * runner.num_kv_heads * runner.head_dim * positions * elem
