"""Per-row token choice (greedy, temperature, top-k, top-p, seeded), logit processing (logit bias, penalties),
log-probs; streamed text with stop strings is `server.text_stream.TextStream` (re-exported here).

Numerically safe for every value the API accepts: a temperature below GREEDY_BELOW (1e-5, as vLLM) is
greedy, the limit of softmax(logits / T) as T -> 0 (dividing by a smaller T overflows float32 to inf, and
inf - inf is NaN); the top-p nucleus always keeps the most likely token (a top_p that rounds to 0 in float32
keeps exactly it); a row whose logits are not finite (NaN, +inf, or all -inf) fails alone. `sample_batch`
never raises for one row: each row gets its token or its own exception, so a failure stays with its row.

Per step, for the rows of a batch (vectorised over the rows that ask for each part):
  1. scores = logits + logit_bias (OpenAI: the bias is added to the model's logits before sampling);
  2. penalties over the row's generated tokens (`RowSampler.counts`, the count of each token id so far):
     repetition_penalty (CTRL / Hugging Face: a seen token's positive score is divided by it, a negative one
     multiplied), then OpenAI's `score -= count * frequency_penalty + (count > 0) * presence_penalty`;
  3. log-probs (when asked) = log_softmax(scores): the model's distribution as this request changed it
     (bias, penalties), before temperature, top-k and top-p, which only shape how the token is drawn;
  4. the token: argmax(scores) when greedy, else drawn from softmax(filter(scores / T)).
A row that asks for none of 1-3 is never copied or changed: its token is exactly what it was without them.
Steps 1-2 live in server.logits.

Batched draw (step 4): the per-row temperature, top-k and top-p are tensors built once per row set
(`SamplingPlan`, cached while the rows stay the same). Top-p rows are sorted once, together, and filtered
in sorted order (top-k first: every token below the k-th score goes, ties at the k-th stay; then the
nucleus); top-k-only rows are cut at their k-th score (torch.topk, no sort); rows that ask for neither are
not filtered; a batch of greedy rows alone takes one argmax (`_argmax_tokens`). Each drawn row takes one
uniform u from its own generator per step and gets the first token whose cumulative
probability exceeds u times the total (inverse CDF, over all drawn rows at once), so a seed gives the same
tokens alone or in any batch. The tokens, the per-row finiteness flags and the log-probs reach the host in
one transfer per call (`_to_host`).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from server.logits import (
    GREEDY_BELOW,
    RowSampler,
    is_greedy,
    make_generator,
    process_logits,
    processed_scores,
)
from server.requests import SamplingParams, TokenEvent
from server.text_stream import REPLACEMENT_CHAR, SINGLE_CACHE_IDS, TextStream

__all__ = [
    "GREEDY_BELOW",
    "NonFiniteLogits",
    "REPLACEMENT_CHAR",
    "RowSampler",
    "Sampled",
    "SamplingPlan",
    "TextStream",
    "is_greedy",
    "make_generator",
    "process_logits",
    "sample_batch",
    "sample_tokens",
    "sampling_plan",
]

EXACT_FLOAT_IDS = 1 << 24  # token ids up to this are exact in float32


class NonFiniteLogits(ValueError):
    """The model's logits for one row contain NaN or +inf (or are all -inf): nothing can be sampled."""


@dataclass(frozen=True)
class Sampled:
    """One row's token, with its log-prob and the most likely alternatives when the request asked."""

    token: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()

    def annotate(self, event: TokenEvent) -> TokenEvent:
        """`event` (about this token) with the log-probs attached."""
        if self.logprob is None or event.token_id is None:
            return event
        return replace(event, logprob=self.logprob, top_logprobs=self.top_logprobs)


@dataclass(frozen=True)
class SamplingPlan:
    """A row set's per-row sampling parameters as tensors. The drawn rows are ordered top-p rows first
    (`nucleus` of them), then top-k-only rows (`cut`), then plain ones."""

    rows: tuple[weakref.ref[RowSampler], ...]
    drawn: tuple[int, ...]  # batch rows drawn at random, in the order above
    drawn_idx: torch.Tensor  # [S] long
    nucleus: int
    cut: int
    temperature: torch.Tensor  # [S, 1] float32
    top_k: torch.Tensor  # [S, 1] long, V when off
    k_max: int  # the largest k of the top-k-only rows
    top_p: torch.Tensor  # [nucleus, 1] float32, 2 when off (nothing dropped)
    logprob_rows: tuple[int, ...]  # batch rows that asked for log-probs
    logprob_idx: torch.Tensor  # [L] long
    logprob_k: int  # the most alternatives any of them asked for
    plain: bool  # every row is greedy with no logit processing and no log-probs: argmax only
    observed: tuple[int, ...]  # rows whose sampler counts its tokens (penalties)

    def matches(self, samplers: Sequence[RowSampler]) -> bool:
        return len(self.rows) == len(samplers) and all(
            r() is s for r, s in zip(self.rows, samplers, strict=True)
        )


def _build_plan(samplers: Sequence[RowSampler], vocab: int, device: torch.device) -> SamplingPlan:
    drawn = [b for b, s in enumerate(samplers) if s.sampled]
    has_k = {b for b in drawn if 0 < samplers[b].params.top_k < vocab}
    has_p = [b for b in drawn if 0 < samplers[b].params.top_p < 1]
    cut = [b for b in drawn if b in has_k and b not in has_p]
    order = has_p + cut + [b for b in drawn if b not in has_k and b not in has_p]
    params = [samplers[b].params for b in order]
    logprob_rows = tuple(b for b, s in enumerate(samplers) if s.params.logprobs is not None)

    def tensor(values: list[float] | list[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(device)

    return SamplingPlan(
        rows=tuple(weakref.ref(s) for s in samplers),
        drawn=tuple(order),
        drawn_idx=tensor(order, torch.long),  # [S]
        nucleus=len(has_p),
        cut=len(cut),
        temperature=tensor([p.temperature for p in params], torch.float32)[:, None],  # [S, 1]
        top_k=tensor([samplers[b].params.top_k if b in has_k else vocab for b in order], torch.long)[:, None],
        k_max=max((samplers[b].params.top_k for b in cut), default=0),
        top_p=tensor([p.top_p for p in params[: len(has_p)]], torch.float32)[:, None],  # [nucleus, 1]
        logprob_rows=logprob_rows,
        logprob_idx=tensor(list(logprob_rows), torch.long),  # [L]
        logprob_k=min(max((samplers[b].params.logprobs or 0 for b in logprob_rows), default=0), vocab),
        plain=not order and not logprob_rows and not any(s.processes for s in samplers),
        observed=tuple(b for b, s in enumerate(samplers) if s.penalised),
    )


_PLANS: OrderedDict[tuple[object, ...], SamplingPlan] = OrderedDict()
_PLANS_LOCK = threading.Lock()


def _plan(samplers: Sequence[RowSampler], vocab: int, device: torch.device) -> SamplingPlan:
    """The row set's plan, built once while the same samplers (by identity) come back in the same order."""
    key = (vocab, device, *map(id, samplers))
    with _PLANS_LOCK:
        plan = _PLANS.get(key)
        if plan is not None and plan.matches(samplers):
            _PLANS.move_to_end(key)
            return plan
    plan = _build_plan(samplers, vocab, device)
    with _PLANS_LOCK:
        _PLANS[key] = plan
        while len(_PLANS) > 8:  # a few engines' current row sets
            _PLANS.popitem(last=False)
    return plan


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weights [N, V] (>= 0, unnormalised), u [N, 1] in [0, 1) -> (index [N, 1] of the first token whose
    cumulative weight exceeds u * total, ok [N]: the total is finite and positive)."""
    cdf = weights.cumsum(-1)  # [N, V]
    total = cdf[:, -1:]  # [N, 1]
    index = torch.searchsorted(cdf, u * total, right=True).clamp_(max=weights.shape[-1] - 1)  # [N, 1]
    return index, (torch.isfinite(total) & (total > 0))[:, 0]


def _draw(scores: torch.Tensor, plan: SamplingPlan, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [B, V], u [S, 1] -> (token [S], ok [S]) for the plan's drawn rows."""
    x = scores[plan.drawn_idx].float() / plan.temperature  # [S, V] a copy: scores stay as they are
    n, k = plan.nucleus, plan.nucleus + plan.cut
    tokens, ok = [], []
    if n:
        ranked, order = torch.sort(x[:n], dim=-1, descending=True, stable=True)  # [n, V] each
        kth = ranked.gather(1, plan.top_k[:n] - 1)  # [n, 1]
        ranked = ranked.masked_fill(ranked < kth, float("-inf"))  # [n, V] top-k (ties at the k-th stay)
        probs = torch.softmax(ranked, dim=-1)  # [n, V]
        drop = probs.cumsum(-1) - probs >= plan.top_p  # [n, V] mass before the token >= p
        drop[:, 0] = False  # the top token stays (top_p may round to 0 in float32)
        index, fine = _inverse_cdf(probs.masked_fill(drop, 0.0), u[:n])  # [n, 1], [n]
        tokens.append(order.gather(1, index)[:, 0])  # [n]
        ok.append(fine)
    if k > n:
        kth = torch.topk(x[n:k], plan.k_max, dim=-1).values.gather(1, plan.top_k[n:k] - 1)  # [c, 1]
        x[n:k] = x[n:k].masked_fill(x[n:k] < kth, float("-inf"))  # [c, V]
    if x.shape[0] > n:
        index, fine = _inverse_cdf(torch.softmax(x[n:], dim=-1), u[n:])  # [S - n, 1], [S - n]
        tokens.append(index[:, 0])
        ok.append(fine)
    return torch.cat(tokens), torch.cat(ok)  # [S], [S]


def _device_step(scores: torch.Tensor, plan: SamplingPlan, u: torch.Tensor) -> torch.Tensor:
    """scores [B, V] -> one vector: token [B], ok [B], then for the log-prob rows (if any; else int64) the
    token's log-prob [L] and the top alternatives' log-probs [L * k] and ids [L * k]. Nothing leaves the
    device."""
    top, tokens = torch.max(scores, dim=-1)  # [B], [B] argmax: the greedy token; NaN and +inf propagate
    ok = torch.isfinite(top)  # [B]
    if plan.drawn:
        drawn, fine = _draw(scores, plan, u)  # [S], [S]
        tokens = tokens.index_put((plan.drawn_idx,), drawn)  # [B]
        ok = ok.index_put((plan.drawn_idx,), ok[plan.drawn_idx] & fine)  # [B]
    parts = [tokens, ok.long()]
    if plan.logprob_rows:  # log-probs too: float64 holds every token id exactly
        parts = [tokens.double(), ok.double()]
        lp = torch.log_softmax(scores[plan.logprob_idx].float(), dim=-1)  # [L, V]
        parts.append(lp.gather(1, tokens[plan.logprob_idx, None])[:, 0].double())  # [L]
        if plan.logprob_k:
            best = torch.topk(lp, plan.logprob_k, dim=-1)  # values, indices [L, k]
            parts += [best.values.flatten().double(), best.indices.flatten().double()]  # [L * k] each
    return torch.cat(parts)  # [2B + L + 2Lk]


def _to_host(values: torch.Tensor) -> list[float]:
    """The call's one device -> host transfer."""
    return values.tolist()


def _unpack(
    flat: list[float], plan: SamplingPlan, samplers: Sequence[RowSampler]
) -> list[Sampled | Exception]:
    size, lp_rows, k = len(samplers), plan.logprob_rows, plan.logprob_k
    tokens, ok = flat[:size], flat[size : 2 * size]
    out: list[Sampled | Exception] = [
        Sampled(int(t)) if fine else NonFiniteLogits(_NON_FINITE) for t, fine in zip(tokens, ok, strict=True)
    ]
    at = 2 * size + len(lp_rows)  # the chosen tokens' log-probs are flat[2 * size : at]
    values, ids = flat[at : at + len(lp_rows) * k], flat[at + len(lp_rows) * k :]
    for r, b in enumerate(lp_rows):
        want = samplers[b].params.logprobs or 0
        if ok[b]:
            pairs = tuple((int(ids[r * k + j]), values[r * k + j]) for j in range(want))
            out[b] = Sampled(int(tokens[b]), flat[2 * size + r], pairs)
    return out


def sampling_plan(samplers: Sequence[RowSampler], vocab: int, device: torch.device) -> SamplingPlan:
    """The plan `sample_batch` uses for these rows (a caller that keeps the same rows may keep it)."""
    return _plan(samplers, vocab, device)


def sample_batch(
    logits: torch.Tensor, samplers: Sequence[RowSampler], plan: SamplingPlan | None = None
) -> list[Sampled | Exception]:
    """logits [B, V] -> per row its Sampled token, or the exception that row raised (it fails alone).
    `plan`: `sampling_plan(samplers, V, logits.device)` of exactly these samplers, when the caller kept it.

    Greedy rows share one argmax; a row whose maximum score is not finite (NaN propagates into the maximum,
    as does +inf; an all -inf row has -inf) is refused with NonFiniteLogits. If the rows fail together, each
    is computed alone (with the same draw), so a failure is its row's.
    """
    if plan is None:
        plan = _plan(samplers, logits.shape[-1], logits.device)
    if plan.plain:  # greedy rows only, nothing processed: argmax, one transfer, shared Sampled objects
        marked = _argmax_tokens(logits)
        if marked is not None:
            get = _GREEDY.get  # (a float id finds its int key: equal numbers hash alike)
            return [(get(t) or _greedy(int(t))) if t == t else NonFiniteLogits(_NON_FINITE) for t in marked]
    scores, failed = processed_scores(logits, samplers)  # [B, V]
    draws: dict[int, torch.Tensor] = {}
    for b in plan.drawn:
        gen = samplers[b].generator
        assert gen is not None  # drawn rows have one
        try:
            draws[b] = torch.rand(1, generator=gen, device=gen.device).to(logits.device)  # [1]
        except Exception as exc:  # e.g. a generator on another device: this row's failure
            failed[b] = exc
    zero = torch.zeros(1, device=logits.device)  # [1]
    u = torch.stack([draws.get(b, zero) for b in plan.drawn]) if plan.drawn else zero[:, None]  # [S, 1]
    try:
        out = _unpack(_to_host(_device_step(scores, plan, u)), plan, samplers)
    except Exception:  # together failed: each row alone, a failure is that row's
        out = []
        for b, s in enumerate(samplers):
            try:
                alone = _build_plan([s], logits.shape[-1], logits.device)  # not cached
                row_u = draws.get(b, zero)[:, None]  # [1, 1]
                out.append(_unpack(_to_host(_device_step(scores[b : b + 1], alone, row_u)), alone, [s])[0])
            except Exception as exc:
                out.append(exc)
    for b, error in failed.items():
        out[b] = error
    for b in plan.observed:
        result = out[b]
        if isinstance(result, Sampled):
            samplers[b].observe(result.token)
    return out


def _argmax_tokens(logits: torch.Tensor) -> list[float] | None:
    """logits [B, V] -> each row's argmax as a float (exact), NaN where the row's maximum is not finite;
    None if that fails (the general path then attributes the failure to its rows)."""
    try:
        top, best = torch.max(logits, dim=-1)  # [B], [B]; NaN and +inf propagate into the maximum
        if logits.shape[-1] <= EXACT_FLOAT_IDS:  # ids exact in float32: two small kernels
            marked: list[float] = (best + (top - top)).tolist()  # [B]: top - top is 0, or NaN
        else:
            marked = torch.where(torch.isfinite(top), best.double(), float("nan")).tolist()  # [B]
    except Exception:
        return None
    return marked


_NON_FINITE = "the model produced non-finite logits for this request"
_GREEDY: dict[float, Sampled] = {}  # Sampled(token) without log-probs by id, shared (immutable)


def _greedy(token: int) -> Sampled:
    sampled = _GREEDY.get(token)
    if sampled is None:
        sampled = Sampled(token)
        if len(_GREEDY) < SINGLE_CACHE_IDS:
            _GREEDY[token] = sampled
    return sampled


def sample_tokens(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> list[int | Exception]:
    """logits [B, V] -> per row a token id or its exception (`sample_batch` for stateless rows)."""
    samplers = [RowSampler(p, g) for p, g in zip(params, generators, strict=True)]
    return [t if isinstance(t, Exception) else t.token for t in sample_batch(logits, samplers)]
