"""Streamed text of generated tokens with stop strings (`TextStream`), incremental and O(1) per token."""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["REPLACEMENT_CHAR", "SINGLE_CACHE_IDS", "TextStream"]

REPLACEMENT_CHAR = "\ufffd"
SINGLE_CACHE_IDS = 1 << 18  # entries of a shared decode([id]) cache (TextStream), and of shared Sampled ids


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
    Without stop strings a token that completes its text takes one decode (the window); the next context,
    usually one id, comes from `single`, a decode([id]) cache the streams of one tokenizer share.
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        stop: Sequence[str] = (),
        single: dict[int, str] | None = None,
    ) -> None:
        self._decode = decode
        # decode([id]) of single ids, shared by the streams of one tokenizer (the usual context is one id)
        self._single: dict[int, str] = {} if single is None else single
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
        ids = self.ids
        ids.append(token_id)
        if not self.stop and not self._full and self.emitted == self._committed:
            # No stop strings and no text emitted ahead of the committed text (the usual case): the new
            # committed text is the output, as the general path below gives it, with one decode per token.
            context = self._context
            window = self._decode(ids[self._prefix :])
            if len(window) > len(context) and window[-1] != REPLACEMENT_CHAR and window.startswith(context):
                new = window[len(context) :]
                self._committed = self.emitted = self._base = self._committed + len(new)
                self._tail = self._pending = ""
                prefix = self._prefix = self._read
                read = self._read = len(ids)
                cached = self._single.get(token_id) if read - prefix == 1 else None
                self._context = self._text(prefix) if cached is None else cached
                return new, False
            self._advance(window)  # anything else: the general path, from the same state
        elif not self._full:
            self._advance(self._decode(ids[self._prefix :]))
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

    def _advance(self, window: str) -> None:
        """`window`: the ids since the last committed text decoded in their one-token context
        (decode(ids[_prefix:])); commit when complete."""
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
        self._context = self._text(self._prefix)

    def _text(self, prefix: int) -> str:
        """decode(ids[prefix:]): single ids from the shared cache."""
        ids = self.ids
        if len(ids) - prefix != 1:
            return self._decode(ids[prefix:])
        token = ids[prefix]
        text = self._single.get(token)
        if text is None:
            text = self._decode([token])
            if len(self._single) < SINGLE_CACHE_IDS:
                self._single[token] = text
        return text

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
