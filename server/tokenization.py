"""Request text -> prompt token ids: bounded before any work, and user text is never read as control tokens.

Bounds: a prompt of at most N tokens holds at most N x `chars_per_token` characters, where chars_per_token
is the length of the tokenizer's longest vocabulary entry (a token never stands for more characters than
its own spelling has: byte-level BPE spells each byte as one character), and at least 16 (a margin for
normalizers that shorten text). A `prompt`, or the sum of all message contents, over that many characters
cannot fit and is refused (422) before it is tokenized or any chat template runs.

Control tokens: the tokenizer's special tokens (e.g. `<|im_start|>`) in user text stay text. A plain prompt
is tokenized with `split_special_tokens=True` (a BOS the tokenizer adds itself stays). A chat is rendered
once with a sentinel in place of each message's content, which locates the template's own text and its
control tokens; the real rendering is tokenized as a whole (exactly what `apply_chat_template` gives) and
kept when its control tokens are exactly the template's. Otherwise the text between the template's control
tokens is tokenized with `split_special_tokens=True`, so a forged marker in a message becomes plain text.
"""

from __future__ import annotations

import contextlib
import secrets
import weakref
from collections.abc import Sequence
from typing import Any

from server.errors import BadRequest, LimitExceeded

MIN_CHARS_PER_TOKEN = 16
Span = tuple[int, int, int]  # (start, end, token id) of a control token in the rendered text

_longest: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def chars_per_token(tokenizer: Any) -> int:
    """Most characters one token can stand for (cached per tokenizer)."""
    try:
        return _longest[tokenizer]
    except (KeyError, TypeError):
        pass
    get_vocab = getattr(tokenizer, "get_vocab", None)
    vocab = get_vocab() if callable(get_vocab) else {}
    value = max([MIN_CHARS_PER_TOKEN, *(len(t) for t in vocab)])
    with contextlib.suppress(TypeError):  # not weak-referenceable: computed each time
        _longest[tokenizer] = value
    return value


def check_text_bounds(
    tokenizer: Any, max_tokens: int, prompt: str | None, messages: Sequence[dict[str, str]] | None
) -> None:
    """Refuse text that cannot fit in `max_tokens` tokens, before tokenizing or templating it."""
    per_token = chars_per_token(tokenizer)
    limit = max_tokens * per_token
    if messages is None:
        field, what, chars = "prompt", "prompt has", len(prompt or "")
    else:
        field, what, chars = "messages", "messages have", sum(len(m["content"]) for m in messages)
    if chars > limit:
        raise LimitExceeded(
            f"{what} {chars} characters; a prompt of at most {max_tokens} tokens "
            f"(SOFTSERVE_MAX_PROMPT_TOKENS) holds at most {limit} characters ({per_token} per token, this "
            "tokenizer's longest token)",
            field=field,
        )


def encode_text(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """User text -> ids; special-token spellings in it are tokenized as text."""
    enc = tokenizer(text, add_special_tokens=add_special_tokens, split_special_tokens=True)
    return [int(i) for i in enc["input_ids"]]


def encode_chat(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Messages -> ids through the tokenizer's chat template (with the generation prompt); the control tokens
    are exactly the ones the template emits, the contents are text."""
    if not getattr(tokenizer, "chat_template", None):
        return encode_text(
            tokenizer, "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
        )
    text = _render(tokenizer, messages)
    nonce = secrets.token_hex(8)
    marks = [f"\ue000{nonce}:{i}\ue001" for i in range(len(messages))]
    skeleton = _render(tokenizer, [{**m, "content": mark} for m, mark in zip(messages, marks, strict=True)])
    template_parts = _split_on(skeleton, marks)
    if template_parts is None or _interleave(template_parts, messages) != text:
        return _encode_unlocated(tokenizer, text, messages)
    controls = _template_controls(tokenizer, template_parts, messages)
    if not getattr(tokenizer, "is_fast", False):  # no offsets to compare: always the split form
        return _encode_split(tokenizer, text, controls)
    whole = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [int(i) for i in whole["input_ids"]]
    special = _special_ids(tokenizer)
    found = [
        (int(s), int(e), t) for t, (s, e) in zip(ids, whole["offset_mapping"], strict=True) if t in special
    ]
    if found == controls:
        return ids  # the template's control tokens and no other: exactly apply_chat_template's ids
    return _encode_split(tokenizer, text, controls)


def _render(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    try:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # e.g. a template that raises on the order of roles
        raise BadRequest(
            f"the model's chat template cannot render these messages: {type(exc).__name__}: {exc}"[:300],
            field="messages",
        ) from exc
    return str(text)


def _split_on(skeleton: str, marks: list[str]) -> list[str] | None:
    """The template's text around the marks (len(marks) + 1 parts), or None unless each mark appears
    exactly once and in order."""
    parts: list[str] = []
    rest = skeleton
    for mark in marks:
        if skeleton.count(mark) != 1:
            return None
        before, sep, rest = rest.partition(mark)
        if not sep:
            return None
        parts.append(before)
    parts.append(rest)
    return parts


def _interleave(parts: list[str], messages: Sequence[dict[str, str]]) -> str:
    contents = [m["content"] for m in messages] + [""]
    return "".join(p + c for p, c in zip(parts, contents, strict=True))


def _special_ids(tokenizer: Any) -> set[int]:
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    decoder = getattr(tokenizer, "added_tokens_decoder", {})
    return ids | {int(i) for i, tok in decoder.items() if getattr(tok, "special", False)}


def _template_controls(tokenizer: Any, parts: list[str], messages: Sequence[dict[str, str]]) -> list[Span]:
    """The control tokens of the template's own text, at their offsets in the real rendering."""
    special = _special_ids(tokenizer)
    spans: list[Span] = []
    offset = 0
    for part, content in zip(parts, [m["content"] for m in messages] + [""], strict=True):
        spans += [(offset + s, offset + e, t) for s, e, t in _controls_in(tokenizer, part, special)]
        offset += len(part) + len(content)
    return spans


def _controls_in(tokenizer: Any, text: str, special: set[int]) -> list[Span]:
    """Control tokens of `text` (tokenized with special tokens recognized) and where they are in it."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        pairs = zip(enc["input_ids"], enc["offset_mapping"], strict=True)
        return [(int(s), int(e), int(t)) for t, (s, e) in pairs if int(t) in special]
    spans: list[Span] = []
    pos = 0
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        if int(token) in special:
            spelled = str(tokenizer.convert_ids_to_tokens(int(token)))
            start = text.index(spelled, pos)
            spans.append((start, start + len(spelled), int(token)))
            pos = start + len(spelled)
    return spans


def _encode_split(tokenizer: Any, text: str, controls: list[Span]) -> list[int]:
    """The template's control tokens as ids; all text between them tokenized as text."""
    ids: list[int] = []
    cursor = 0
    for start, end, token in controls:
        if start > cursor:
            ids += encode_text(tokenizer, text[cursor:start], add_special_tokens=False)
        ids.append(token)
        cursor = end
    if cursor < len(text):
        ids += encode_text(tokenizer, text[cursor:], add_special_tokens=False)
    return ids


def _encode_unlocated(tokenizer: Any, text: str, messages: Sequence[dict[str, str]]) -> list[int]:
    """A template that changes or repeats message contents: the contents cannot be located in its output,
    so a content spelling a control token is refused; other chats tokenize as the template renders them."""
    special = {tokenizer.convert_ids_to_tokens(i) for i in _special_ids(tokenizer)}
    for i, m in enumerate(messages):
        forged = next((s for s in special if s and s in m["content"]), None)
        if forged is not None:
            raise BadRequest(
                f"messages[{i}].content contains the control token {forged!r}, which this model's chat "
                "template cannot keep as text",
                field=f"messages[{i}].content",
            )
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


# ---- one token as text and bytes (log-probs) ------------------------------------------------------------


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character that spells each byte -> the byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


BYTE_OF_CHAR = _byte_alphabet()


def is_byte_level(tokenizer: Any) -> bool:
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    return type(decoder).__name__ == "ByteLevel"


def token_piece(tokenizer: Any, token_id: int) -> tuple[str, bytes]:
    """(text, bytes) of one token: a byte-level BPE token's exact bytes (a piece of a multi-byte character
    too), its text their UTF-8 decoding (U+FFFD for an incomplete character); other tokenizers: the
    token decoded alone, and its UTF-8 bytes."""
    if is_byte_level(tokenizer):
        spelled = tokenizer.convert_ids_to_tokens(int(token_id))
        if isinstance(spelled, str) and spelled and all(c in BYTE_OF_CHAR for c in spelled):
            raw = bytes(BYTE_OF_CHAR[c] for c in spelled)
            return raw.decode("utf-8", "replace"), raw
    text = str(tokenizer.decode([int(token_id)]))
    return text, text.encode("utf-8", "backslashreplace")
