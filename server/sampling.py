"""Per-row token choice (greedy, temperature, top-k, top-p, seeded), logit processing (logit bias, penalties),
log-probs, and streamed text with stop strings.

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

Batched draw (step 4): the per-row temperature, top-k and top-p are tensors built once per row set (`_Plan`,
cached while the rows stay the same). Top-p rows are sorted once, together, and filtered in sorted order
(top-k first: every token below the k-th score goes, ties at the k-th stay; then the nucleus); top-k-only
rows are cut at their k-th score (torch.topk, no sort); rows that ask for neither are not filtered. Each
drawn row takes one uniform u from its own generator per step and gets the first token whose cumulative
probability exceeds u times the total (inverse CDF, over all drawn rows at once), so a seed gives the same
tokens alone or in any batch. The tokens, the per-row finiteness flags and the log-probs reach the host in
one transfer per call (`_to_host`).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
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

__all__ = [
    "GREEDY_BELOW",
    "NonFiniteLogits",
    "REPLACEMENT_CHAR",
    "RowSampler",
    "Sampled",
    "TextStream",
    "is_greedy",
    "make_generator",
    "process_logits",
    "sample_batch",
    "sample_tokens",
]

REPLACEMENT_CHAR = "\ufffd"


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
class _Plan:
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

    def matches(self, samplers: Sequence[RowSampler]) -> bool:
        return len(self.rows) == len(samplers) and all(
            r() is s for r, s in zip(self.rows, samplers, strict=True)
        )


def _build_plan(samplers: Sequence[RowSampler], vocab: int, device: torch.device) -> _Plan:
    drawn = [b for b, s in enumerate(samplers) if s.sampled]
    has_k = {b for b in drawn if 0 < samplers[b].params.top_k < vocab}
    has_p = [b for b in drawn if 0 < samplers[b].params.top_p < 1]
    cut = [b for b in drawn if b in has_k and b not in has_p]
    order = has_p + cut + [b for b in drawn if b not in has_k and b not in has_p]
    params = [samplers[b].params for b in order]
    logprob_rows = tuple(b for b, s in enumerate(samplers) if s.params.logprobs is not None)

    def tensor(values: list[float] | list[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(device)

    return _Plan(
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
    )


_PLANS: OrderedDict[tuple[object, ...], _Plan] = OrderedDict()
_PLANS_LOCK = threading.Lock()


def _plan(samplers: Sequence[RowSampler], vocab: int, device: torch.device) -> _Plan:
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


def _draw(scores: torch.Tensor, plan: _Plan, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


def _device_step(scores: torch.Tensor, plan: _Plan, u: torch.Tensor) -> torch.Tensor:
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


def _unpack(flat: list[float], plan: _Plan, samplers: Sequence[RowSampler]) -> list[Sampled | Exception]:
    size, lp_rows, k = len(samplers), plan.logprob_rows, plan.logprob_k
    tokens, ok = flat[:size], flat[size : 2 * size]
    out: list[Sampled | Exception] = [
        Sampled(int(t)) if fine else NonFiniteLogits("the model produced non-finite logits for this request")
        for t, fine in zip(tokens, ok, strict=True)
    ]
    at = 2 * size + len(lp_rows)  # the chosen tokens' log-probs are flat[2 * size : at]
    values, ids = flat[at : at + len(lp_rows) * k], flat[at + len(lp_rows) * k :]
    for r, b in enumerate(lp_rows):
        want = samplers[b].params.logprobs or 0
        if ok[b]:
            pairs = tuple((int(ids[r * k + j]), values[r * k + j]) for j in range(want))
            out[b] = Sampled(int(tokens[b]), flat[2 * size + r], pairs)
    return out


def sample_batch(logits: torch.Tensor, samplers: Sequence[RowSampler]) -> list[Sampled | Exception]:
    """logits [B, V] -> per row its Sampled token, or the exception that row raised (it fails alone).

    Greedy rows share one argmax; a row whose maximum score is not finite (NaN propagates into the maximum,
    as does +inf; an all -inf row has -inf) is refused with NonFiniteLogits. If the rows fail together, each
    is computed alone (with the same draw), so a failure is its row's.
    """
    scores, failed = processed_scores(logits, samplers)  # [B, V]
    plan = _plan(samplers, logits.shape[-1], logits.device)
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
    for s, result in zip(samplers, out, strict=True):
        if isinstance(result, Sampled):
            s.observe(result.token)
    return out


def sample_tokens(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> list[int | Exception]:
    """logits [B, V] -> per row a token id or its exception (`sample_batch` for stateless rows)."""
    samplers = [RowSampler(p, g) for p, g in zip(params, generators, strict=True)]
    return [t if isinstance(t, Exception) else t.token for t in sample_batch(logits, samplers)]


class TextStream:
    """Incremental text of generated tokens; holds back text that could still become a stop string.

    `push(token)` returns (new text safe to emit, stopped). When a stop string appears, the text is truncated
    right before it. `flush()` returns what was held back (call it when the request ends another way).

    O(1) per token (amortised), as TGI/vLLM detokenise: decode(ids[prefix:]) minus decode(ids[prefix:read])
    is the new text (the one-token context keeps a SentencePiece leading space and a byte-level character
    split across tokens right). It is committed, and the offsets advance, once it does not end in U+FFFD
    (an incomplete UTF-8 sequence); until then it is pending text, seen by the stop search exactly as a full
    decode shows it. The stop search and the hold-back see only the text not yet emitted plus
    len(longest stop) - 1 characters before it. A decode that is not local (the window's text does not
    start with its context's) makes the stream decode every id from then on, so the text is always what
    decode(ids) gives. Costs grow only while ids decode to no text or to U+FFFD (a run of invalid bytes).
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self.stop = tuple(s for s in stop if s)
        self._longest_stop = max((len(s) for s in self.stop), default=0)
        self._look = max(self._longest_stop - 1, 0)  # characters before `emitted` that a stop may start in
        self.ids: list[int] = []
        self.emitted = 0  # characters of the text (decode(ids)) already handed out
        self._prefix = 0  # ids[_prefix:_read] decode to `_context`: the text just before the new ids
        self._read = 0
        self._context = ""
        self._committed = 0  # characters of decode(ids[:_read])
        self._base = 0  # absolute index of _tail[0]
        self._tail = ""  # decode(ids[:_read])[_base:]
        self._pending = ""  # text of ids[_read:], ends in U+FFFD (or is empty)
        self._full = False  # the decode is not local: decode every id (the text is still exact)
        self._stopped = False

    def push(self, token_id: int) -> tuple[str, bool]:
        if self._stopped:
            return "", True
        self.ids.append(token_id)
        if not self._full:
            self._advance()
        if self._full:
            self._base, self._tail, self._pending = 0, self._decode(self.ids), ""
        text = self._tail + self._pending  # decode(ids)[_base:]
        start = self.emitted - self._base
        cut = self._find_stop(text, start)  # held-back text starts at `emitted`, so any new stop does too
        if cut is not None:
            out = text[start : max(cut, start)]
            self._tail, self._pending = text[:cut], ""
            self.emitted = self._base + cut
            self._stopped = True
            return out, True
        end = self._safe_end(text)
        out = text[start:end] if end > start else ""
        self.emitted = max(self.emitted, self._base + end)
        if not self._full:  # keep only what the next search can reach
            base = max(self._base, min(self.emitted, self._committed) - self._look)
            self._tail = self._tail[base - self._base :]
            self._base = base
        return out, False

    def flush(self) -> str:
        text = self._tail + self._pending
        out = text[self.emitted - self._base :]
        self.emitted = self._base + len(text)
        return out

    def _advance(self) -> None:
        """Decode the ids since the last committed text in their one-token context; commit when complete."""
        window = self._decode(self.ids[self._prefix :])
        if not window.startswith(self._context):
            self._full = True
            return
        new = window[len(self._context) :]
        if not new or new.endswith(REPLACEMENT_CHAR):
            self._pending = new
            return
        self._tail += new
        self._committed += len(new)
        self._pending = ""
        self._prefix, self._read = self._read, len(self.ids)
        self._context = self._decode(self.ids[self._prefix : self._read])

    def _find_stop(self, text: str, start: int) -> int | None:
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _safe_end(self, text: str) -> int:
        end = len(text)
        while end > 0 and text[end - 1] == REPLACEMENT_CHAR:  # an incomplete UTF-8 sequence so far
            end -= 1
        for k in range(min(self._look, end), 0, -1):
            tail = text[end - k : end]
            if any(s.startswith(tail) for s in self.stop):
                return end - k
        return end
