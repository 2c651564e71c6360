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
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from server.requests import SamplingParams, TokenEvent

REPLACEMENT_CHAR = "\ufffd"
GREEDY_BELOW = 1e-5  # temperatures below this are greedy (vLLM's _SAMPLING_EPS)


class NonFiniteLogits(ValueError):
    """The model's logits for one row contain NaN or +inf (or are all -inf): nothing can be sampled."""


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature < GREEDY_BELOW


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A per-request generator (seeded if the request has a seed); None for greedy requests."""
    if is_greedy(params):
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
    return gen


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [V] -> logits [V] with everything outside top-k / the top-p nucleus set to -inf.

    The most likely token always stays, so at least one token can be sampled whatever top_p is.
    """
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]  # []
        logits = logits.masked_fill(logits < kth, float("-inf"))  # [V]
    if 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)  # [V], [V]
        probs = torch.softmax(sorted_logits, dim=-1)  # [V]
        drop_sorted = probs.cumsum(-1) - probs >= top_p  # [V] mass before the token >= p
        drop_sorted[0] = False  # the top token stays (top_p may round to 0 in float32)
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)  # [V]
        logits = logits.masked_fill(drop, float("-inf"))  # [V]
    return logits


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits [V] (float32, finite maximum) -> one token id."""
    if is_greedy(params) or generator is None:
        return int(torch.argmax(logits))
    scaled = filter_logits(logits / params.temperature, params.top_k, params.top_p)  # [V]
    probs = torch.softmax(scaled, dim=-1)  # [V]
    return int(torch.multinomial(probs, 1, generator=generator))


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
    """logits [B, V] -> scores [B, V]: steps 1-2 of the module docstring for the rows that ask for them.

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


def _scores(
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


def _logprobs(
    scores: torch.Tensor, tokens: Sequence[int | Exception], samplers: Sequence[RowSampler]
) -> dict[int, tuple[float, tuple[tuple[int, float], ...]]]:
    """Per row that asks: (log-prob of its token, its top-k (id, log-prob)) from log_softmax(scores)."""
    rows = [b for b, s in enumerate(samplers) if s.params.logprobs is not None and isinstance(tokens[b], int)]
    if not rows:
        return {}
    lp = torch.log_softmax(scores[rows].float(), dim=-1)  # [R, V]
    chosen_ids = torch.tensor([tokens[b] for b in rows], dtype=torch.long, device=lp.device)  # [R]
    chosen = lp.gather(1, chosen_ids[:, None])[:, 0]  # [R]
    k = min(max(samplers[b].params.logprobs or 0 for b in rows), lp.shape[-1])
    top = torch.topk(lp, k, dim=-1) if k else None  # values, indices [R, k]
    chosen_list = chosen.tolist()
    top_values, top_ids = (top.values.tolist(), top.indices.tolist()) if top is not None else ([], [])
    out: dict[int, tuple[float, tuple[tuple[int, float], ...]]] = {}
    for r, b in enumerate(rows):
        want = samplers[b].params.logprobs or 0
        pairs = tuple(zip(top_ids[r][:want], top_values[r][:want], strict=True)) if want else ()
        out[b] = (float(chosen_list[r]), pairs)
    return out


def sample_batch(logits: torch.Tensor, samplers: Sequence[RowSampler]) -> list[Sampled | Exception]:
    """logits [B, V] -> per row its Sampled token, or the exception that row raised (it fails alone).

    Greedy rows share one argmax; a row whose maximum score is not finite (NaN propagates into the maximum,
    as does +inf; an all -inf row has -inf) is refused with NonFiniteLogits before anything is sampled.
    """
    scores, failed = _scores(logits, samplers)  # [B, V]
    greedy = torch.argmax(scores, dim=-1)  # [B]
    finite = torch.isfinite(torch.amax(scores, dim=-1))  # [B]
    greedy_ids, finite_rows = torch.stack([greedy, finite.long()]).tolist()  # one device sync
    tokens: list[int | Exception] = []
    for b, s in enumerate(samplers):
        if b in failed:
            tokens.append(failed[b])
        elif not finite_rows[b]:
            tokens.append(NonFiniteLogits("the model produced non-finite logits for this request"))
        elif is_greedy(s.params) or s.generator is None:
            tokens.append(int(greedy_ids[b]))
        else:
            try:
                tokens.append(sample_row(scores[b], s.params, s.generator))
            except Exception as exc:  # this row's sampling failed; the others are unaffected
                tokens.append(exc)
    try:
        logprobs = _logprobs(scores, tokens, samplers)
    except Exception:  # computed together failed: each row alone, a failure is that row's
        logprobs = {}
        for b in range(len(samplers)):
            try:
                single = _logprobs(scores[b : b + 1], tokens[b : b + 1], samplers[b : b + 1])
            except Exception as exc:
                tokens[b] = exc
                continue
            if 0 in single:
                logprobs[b] = single[0]
    out: list[Sampled | Exception] = []
    for b, (s, token) in enumerate(zip(samplers, tokens, strict=True)):
        if isinstance(token, Exception):
            out.append(token)
            continue
        s.observe(token)
        lp, top = logprobs.get(b, (None, ()))
        out.append(Sampled(token, lp, top))
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
