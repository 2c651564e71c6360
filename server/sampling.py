"""Per-row token choice (greedy, temperature, top-k, top-p, seeded) and streamed text with stop strings."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence

import torch

from server.requests import SamplingParams

REPLACEMENT_CHAR = "\ufffd"


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A per-request generator (seeded if the request has a seed); None for greedy requests."""
    if params.temperature <= 0:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
    return gen


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [V] -> logits [V] with everything outside top-k / the top-p nucleus set to -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]  # []
        logits = logits.masked_fill(logits < kth, float("-inf"))  # [V]
    if 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)  # [V], [V]
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)  # [V]
        drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # [V] mass before token >= p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)  # [V]
        logits = logits.masked_fill(drop, float("-inf"))  # [V]
    return logits


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits [V] (float32) -> one token id."""
    if params.temperature <= 0 or generator is None:
        return int(torch.argmax(logits))
    scaled = filter_logits(logits / params.temperature, params.top_k, params.top_p)  # [V]
    probs = torch.softmax(scaled, dim=-1)  # [V]
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_tokens(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> list[int]:
    """logits [B, V] -> B token ids; greedy rows share one argmax."""
    greedy = torch.argmax(logits, dim=-1).tolist()  # [B]
    out: list[int] = []
    for b, (p, gen) in enumerate(zip(params, generators, strict=True)):
        out.append(int(greedy[b]) if p.temperature <= 0 or gen is None else sample_row(logits[b], p, gen))
    return out


class TextStream:
    """Incremental text of generated tokens; holds back text that could still become a stop string.

    `push(token)` returns (new text safe to emit, stopped). When a stop string appears, the text is truncated
    right before it. `flush()` returns what was held back (call it when the request ends another way).
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self.stop = tuple(s for s in stop if s)
        self._longest_stop = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of self.text already handed out

    def push(self, token_id: int) -> tuple[str, bool]:
        self.ids.append(token_id)
        self.text = self._decode(self.ids)
        cut = self._find_stop(self.emitted)  # held-back text starts at `emitted`, so any new stop does too
        if cut is not None:
            out = self.text[self.emitted : max(cut, self.emitted)]
            self.text = self.text[:cut]
            self.emitted = len(self.text)
            return out, True
        end = self._safe_end()
        out = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out, False

    def flush(self) -> str:
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out

    def _find_stop(self, start: int) -> int | None:
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _safe_end(self) -> int:
        text = self.text
        end = len(text)
        while end > 0 and text[end - 1] == REPLACEMENT_CHAR:  # an incomplete UTF-8 sequence so far
            end -= 1
        for k in range(min(self._longest_stop - 1, end), 0, -1):
            tail = text[end - k : end]
            if any(s.startswith(tail) for s in self.stop):
                return end - k
        return end
