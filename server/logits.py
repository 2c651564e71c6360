"""One row's sampling state (`RowSampler`) and the logit processing of a batch: logit bias, then the
repetition / frequency / presence penalties over the row's generated tokens (steps 1-2 of server.sampling's
docstring), vectorised over the rows that ask for them; a row that asks for none is never copied or changed.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

from server.requests import SamplingParams

GREEDY_BELOW = 1e-5  # temperatures below this are greedy (vLLM's _SAMPLING_EPS)


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature < GREEDY_BELOW


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A per-request generator (seeded if the request has a seed); None for greedy requests."""
    if is_greedy(params):
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
    return gen


class RowSampler:
    """One row's sampling state: its params, its generator (None when greedy) and, when a penalty needs
    them, the counts [V] of the tokens it generated; the logit bias as a dense row [V], built at first use."""

    def __init__(self, params: SamplingParams, generator: torch.Generator | None) -> None:
        self.params = params
        self.generator = generator
        self.penalised = (
            params.presence_penalty != 0 or params.frequency_penalty != 0 or params.repetition_penalty != 1
        )
        self.counts: torch.Tensor | None = None  # [V] float32
        self._bias: torch.Tensor | None = None  # [V] float32

    @classmethod
    def create(cls, params: SamplingParams, device: torch.device, vocab_size: int) -> RowSampler:
        """Refuses (ValueError) a logit bias on a token id outside the vocabulary, before any forward."""
        bad = [t for t, _ in params.logit_bias if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"logit_bias token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
        return cls(params, make_generator(params, device))

    @property
    def sampled(self) -> bool:
        """Drawn at random (else greedy: argmax)."""
        return self.generator is not None and not is_greedy(self.params)

    @property
    def processes(self) -> bool:
        return self.penalised or bool(self.params.logit_bias)

    def bias(self, like: torch.Tensor) -> torch.Tensor:
        """The dense logit bias [V] for a score row like `like` [V]."""
        if self._bias is None:
            ids = torch.tensor([t for t, _ in self.params.logit_bias], dtype=torch.long)  # [K]
            values = torch.tensor([v for _, v in self.params.logit_bias], dtype=torch.float32)  # [K]
            dense = torch.zeros(like.shape[-1], dtype=torch.float32)  # [V]
            self._bias = dense.index_put_((ids,), values).to(like.device)  # [V]
        return self._bias

    def token_counts(self, like: torch.Tensor) -> torch.Tensor:
        if self.counts is None:
            self.counts = torch.zeros(like.shape[-1], dtype=torch.float32, device=like.device)  # [V]
        return self.counts

    def observe(self, token: int) -> None:
        """Count a generated token (only a penalised row keeps counts)."""
        if self.penalised and self.counts is not None:
            self.counts[token] += 1


def process_logits(logits: torch.Tensor, samplers: Sequence[RowSampler]) -> torch.Tensor:
    """logits [B, V] -> scores [B, V]: logit bias and penalties for the rows that ask for them.

    Returns `logits` itself when no row does; otherwise a float32 copy in which only those rows changed.
    """
    rows = [b for b, s in enumerate(samplers) if s.processes]
    if not rows:
        return logits
    scores = logits.float().clone()  # [B, V]
    biased = [b for b in rows if samplers[b].params.logit_bias]
    if biased:
        bias = torch.stack([samplers[b].bias(scores[b]) for b in biased])  # [Pb, V]
        scores[biased] = scores[biased] + bias  # [Pb, V]
    penalised = [b for b in rows if samplers[b].penalised]
    if penalised:
        x = scores[penalised]  # [Pp, V]
        counts = torch.stack([samplers[b].token_counts(scores[b]) for b in penalised])  # [Pp, V]
        params = [samplers[b].params for b in penalised]
        per_row = torch.tensor(
            [[p.repetition_penalty, p.frequency_penalty, p.presence_penalty] for p in params],
            dtype=torch.float32,
            device=x.device,
        )  # [Pp, 3]
        rep, freq, pres = per_row[:, 0:1], per_row[:, 1:2], per_row[:, 2:3]  # [Pp, 1] each
        seen = counts > 0  # [Pp, V]
        x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)  # [Pp, V]
        x = x - counts * freq - seen.to(x.dtype) * pres  # [Pp, V]
        scores[penalised] = x  # [Pp, V]
    return scores


def processed_scores(
    logits: torch.Tensor, samplers: Sequence[RowSampler]
) -> tuple[torch.Tensor, dict[int, Exception]]:
    """Processed scores [B, V]; if processing the rows together fails, each row is processed alone and a
    row whose own processing fails gets its exception (its scores row is left as the logits)."""
    try:
        return process_logits(logits, samplers), {}
    except Exception:
        failed: dict[int, Exception] = {}
        scores = logits.float().clone()  # [B, V]
        for b, s in enumerate(samplers):
            try:
                scores[b] = process_logits(logits[b : b + 1], [s])[0]  # [V]
            except Exception as exc:
                failed[b] = exc
        return scores, failed
