"""Hand-computed references for the sampling features (no server code): greedy decoding of the plain HF model,
one full forward per step, with OpenAI's logit_bias and penalties applied by hand to that step's logits."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Reference:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # of each token, from log_softmax(processed logits)
    top: list[list[tuple[int, float]]] = field(default_factory=list)  # the k most likely at each step


def penalised(
    logits: torch.Tensor,
    generated: list[int],
    presence: float = 0.0,
    frequency: float = 0.0,
    repetition: float = 1.0,
    bias: dict[int, float] | None = None,
) -> torch.Tensor:
    """logits [V] -> [V]: + bias; then for each generated token t seen c times: the CTRL repetition
    penalty (x / r if x > 0 else x * r), then x - c * frequency - presence."""
    x = logits.float().clone()  # [V]
    for t, b in (bias or {}).items():
        x[t] += b
    for t, c in Counter(generated).items():
        v = x[t]
        v = v / repetition if v > 0 else v * repetition
        x[t] = v - c * frequency - presence
    return x


@torch.inference_mode()
def step_logits(model: Any, ids: list[int]) -> torch.Tensor:
    """The model's next-token logits [V] after `ids` (one full forward, no cache)."""
    return model(input_ids=torch.tensor([ids])).logits[0, -1]  # [V]


def greedy(model: Any, ids: list[int], n_new: int, eos: set[int], k: int = 0, **penalties: Any) -> Reference:
    """Greedy tokens of argmax(penalised logits) until n_new tokens or an end-of-sequence token (not kept)."""
    ref = Reference()
    for _ in range(n_new):
        x = penalised(step_logits(model, ids + ref.tokens), ref.tokens, **penalties)  # [V]
        token = int(torch.argmax(x))
        if token in eos:
            break
        add(ref, x, token, k)
    return ref


def forced(model: Any, ids: list[int], tokens: list[int], k: int = 0, **penalties: Any) -> Reference:
    """The log-probs the reference gives the given tokens (e.g. sampled ones), step by step."""
    ref = Reference()
    for token in tokens:
        add(ref, penalised(step_logits(model, ids + ref.tokens), ref.tokens, **penalties), token, k)
    return ref


def add(ref: Reference, x: torch.Tensor, token: int, k: int) -> None:
    lp = torch.log_softmax(x, dim=-1)  # [V]
    ref.tokens.append(token)
    ref.logprobs.append(float(lp[token]))
    top = torch.topk(lp, k) if k else None
    ref.top.append(
        list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else []
    )
