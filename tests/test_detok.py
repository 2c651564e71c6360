"""Incremental detokenisation (`TextStream`): the same text, stops and hold-back as decoding every id at every
token (the old algorithm, kept below as the reference), at O(1) decode work per token."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from tiny_tokenizer import tiny_tokenizer
from tokenizers import Tokenizer, decoders, models
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from prompt_store.embedded_model import ensure_smollm2
from server.sampling import REPLACEMENT_CHAR, TextStream

Decode = Callable[[list[int]], str]
TEXTS = [
    "Hello 🎉 世界! a . b's  x",
    "  leading spaces  and   runs   ",
    "naïve café — 日本語のテキスト 👩‍👩‍👧 end",
    "emoji🎉🎉🎉then text 한국어 ok",
    "stop here STOP there ### done\n\nnext",
    "a b c d e f g ab abc abcd",
]


class OldTextStream:
    """The reference: today's algorithm before this change (decodes every id at every token)."""

    def __init__(self, decode: Decode, stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self.stop = tuple(s for s in stop if s)
        self._longest_stop = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0

    def push(self, token_id: int) -> tuple[str, bool]:
        self.ids.append(token_id)
        self.text = self._decode(self.ids)
        hits = [i for i in (self.text.find(s, self.emitted) for s in self.stop) if i >= 0]
        if hits:
            cut = min(hits)
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

    def _safe_end(self) -> int:
        text = self.text
        end = len(text)
        while end > 0 and text[end - 1] == REPLACEMENT_CHAR:
            end -= 1
        for k in range(min(self._longest_stop - 1, end), 0, -1):
            if any(s.startswith(text[end - k : end]) for s in self.stop):
                return end - k
        return end


def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-style tokenizer: '▁' for spaces, byte fallback, and the decoder strips one leading space."""
    pieces = ["▁", "▁a", "a", "b", "ab", "▁the", "the", "▁cat", ".", "'s", "▁.", "▁▁", "世", "界", "▁世"]
    vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)])}
    vocab.update({p: len(vocab) + i for i, p in enumerate(pieces)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence(  # type: ignore[assignment]
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        clean_up_tokenization_spaces=False,
    )


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, tuple[Decode, Callable[[str], list[int]], list[int]]]:
    """name -> (decode as the runner does, encode, the ids random noise draws from).

    SentencePiece noise leaves out the byte-fallback ids: ByteFallback turns a whole run of byte tokens into
    U+FFFDs once one is invalid, so text already shown (a valid byte) changes under a full decode too, and
    the old stream had already emitted it (no stream can be exact there)."""
    smol = AutoTokenizer.from_pretrained(ensure_smollm2(), local_files_only=True)  # tokenizer only
    out: dict[str, tuple[Decode, Callable[[str], list[int]], list[int]]] = {}
    for name, tok in (
        ("smollm2", smol),
        ("tiny", tiny_tokenizer()),
        ("sentencepiece", sentencepiece_tokenizer()),
    ):

        def decode(ids: list[int], tok: Any = tok) -> str:
            return str(tok.decode(ids, skip_special_tokens=True))

        def encode(text: str, tok: Any = tok) -> list[int]:
            return list(tok(text, add_special_tokens=False)["input_ids"])

        noise = [i for i in range(len(tok)) if not (name == "sentencepiece" and 3 <= i < 259)]
        out[name] = (decode, encode, noise)
    return out


def run(stream: TextStream | OldTextStream, ids: list[int]) -> tuple[list[tuple[str, bool]], str]:
    steps = []
    for token in ids:
        steps.append(stream.push(token))
        if steps[-1][1]:
            break
    return steps, stream.flush()


def cases(rng: random.Random, encode: Callable[[str], list[int]], vocab: list[int]) -> list[list[int]]:
    """Random ids, encoded texts (multi-byte characters split over tokens), and both spliced together."""
    out = [[rng.choice(vocab) for _ in range(rng.randint(1, 40))] for _ in range(60)]
    for text in TEXTS:
        ids = encode(text)
        out.append(ids)
        for _ in range(6):
            i, j = sorted(rng.sample(range(len(ids) + 1), 2))
            noise = [rng.choice(vocab) for _ in range(rng.randint(0, 3))]
            out.append(ids[:i] + noise + ids[i:j] + encode(rng.choice(TEXTS))[: rng.randint(1, 12)])
    return out


def stops_for(rng: random.Random, text: str) -> list[tuple[str, ...]]:
    """No stop, substrings of the text (most span tokens), absent and overlapping ones."""
    clean = text.replace(REPLACEMENT_CHAR, "")
    picks: list[tuple[str, ...]] = [(), ("\u2603never",)]
    for _ in range(4):
        if len(clean) < 2:
            break
        i = rng.randrange(len(clean) - 1)
        s = clean[i : i + rng.randint(1, 6)]
        picks.append((s,))
        picks.append(("zz" + s, s[: max(1, len(s) - 1)] + "\u2603", s[-2:]))
    return picks


@pytest.mark.parametrize("name", ["smollm2", "tiny", "sentencepiece"])
def test_incremental_text_equals_full_decode_and_the_old_stream(
    tokenizers: dict[str, tuple[Decode, Callable[[str], list[int]], list[int]]], name: str
) -> None:
    decode, encode, vocab = tokenizers[name]
    rng = random.Random(13)
    checked = stopped = skipped = 0
    for ids in cases(rng, encode, vocab):
        full = decode(ids)
        steps, rest = run(OldTextStream(decode), ids)
        if (
            "".join(t for t, _ in steps) + rest != full
        ):  # the old stream itself showed text decode(ids) rewrote
            assert (
                name == "sentencepiece"
            )  # only ByteFallback does: an invalid byte turns its whole run to U+FFFD
            continue
        for stop in stops_for(rng, full):
            new_steps, new_flush = run(TextStream(decode, stop), ids)
            old_steps, old_flush = run(OldTextStream(decode, stop), ids)
            assert (new_steps, new_flush) == (old_steps, old_flush), (ids, stop)  # same pieces, same token
            hits = [i for i in (full.find(s) for s in stop) if i >= 0]
            expected = full[: min(hits)] if hits else full
            assert "".join(t for t, _ in new_steps) + new_flush == expected, (ids, stop)
            assert new_steps[-1][1] == bool(hits)
            checked += 1
            stopped += bool(hits)
    assert checked > 300 and stopped > 100 and skipped < 20


def test_split_characters_and_spaces_come_out_whole() -> None:
    tok = tiny_tokenizer()  # one token per byte: every multi-byte character is split over tokens

    def decode(ids: list[int]) -> str:
        return str(tok.decode(ids, skip_special_tokens=True))

    ids = tok("a 🎉世 b", add_special_tokens=False)["input_ids"]
    steps, rest = run(TextStream(decode, stop=("世 b",)), ids)
    assert [t for t, _ in steps if t] == ["a", " ", "🎉"] and steps[-1] == ("", True) and rest == ""
    assert len(steps) == len(tok("a 🎉世 b", add_special_tokens=False)["input_ids"])  # stops at the last byte


def test_decode_work_per_token_does_not_grow_with_length(
    tokenizers: dict[str, tuple[Decode, Callable[[str], list[int]], list[int]]],
) -> None:
    decode, encode, _ = tokenizers["smollm2"]
    ids = (encode("Hello 🎉 世界, the cat's mat. ") * 80)[:1024]
    decoded = 0

    def counting(chunk: list[int]) -> str:
        nonlocal decoded
        decoded += len(chunk)
        return decode(chunk)

    stream = TextStream(counting, stop=("never stop here",))
    text = "".join(stream.push(t)[0] for t in ids) + stream.flush()
    assert text == decode(ids)
    assert decoded <= 8 * len(ids)  # decoding every id at every token: ~len(ids)**2 / 2 = 524,288
    assert len(stream._tail) + len(stream._pending) < 64  # the stop search's text stays short


def test_a_decode_that_is_not_local_falls_back_to_decoding_every_id() -> None:
    pieces = {1: "a", 2: " ", 3: ".", 4: "b"}

    def decode(ids: list[int]) -> str:  # like clean_up_tokenization_spaces: " ." -> "." across tokens
        return "".join(pieces[i] for i in ids).replace(" .", ".")

    ids = [1, 2, 3, 4, 2, 4]
    stream = TextStream(decode, stop=("b b",))
    assert run(stream, ids) == run(OldTextStream(decode, stop=("b b",)), ids) and stream._full
