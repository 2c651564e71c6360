"""Task data: JSONL records, train/eval split, chat-template aware tokenisation, padded batches.

A record is `{"input": ..., "output": ...}` plus `"instruction"` for gist training. The loss covers the
output tokens only (labels are -100 elsewhere). With a chat template (instruct models) the input is the
user turn and the output the assistant turn, exactly as the server renders `messages`; without one the
input is tokenised as a plain prompt (the server's `prompt` path) and the output follows it, ended by EOS.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prompt_store import InputFormat
from runtime.input_format import task_messages, user_text_offset

IGNORE = -100


@dataclass(frozen=True)
class Record:
    """One example: the request text, the expected answer, and (gist) the instruction it answers."""

    input: str
    output: str
    instruction: str = ""


@dataclass(frozen=True)
class Tokenized:
    """Token ids of one record: request (as the server would see it), answer (+ end token), instruction."""

    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    instruction_ids: tuple[int, ...] = ()
    added_at: int = 0  # where the user text starts in prompt_ids (an ACCEPT delta's first token)


@dataclass
class Batch:
    """Right-padded rows. Gist batches lay rows out as [instruction][k gist slots][prompt][target]."""

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long, 1 on real tokens
    labels: torch.Tensor  # [B, T] long, -100 outside the target
    prompt_lengths: torch.Tensor  # [B] long: request tokens per row (where an ACCEPT delta applies)
    gist_start: torch.Tensor | None = None  # [B] long: first gist slot (= instruction length)
    added_at: torch.Tensor | None = None  # [B] long: the user text's first token (runtime.input_format)
    num_gist: int = 0

    @property
    def lengths(self) -> torch.Tensor:
        return self.attention_mask.sum(dim=1)  # [B]


def load_jsonl(path: str | Path) -> list[Record]:
    """Read `{"input","output"[,"instruction"]}` lines; blank lines are skipped, anything else is an error."""
    records = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row: Any = json.loads(line)
            records.append(
                Record(str(row["input"]), str(row["output"]), str(row.get("instruction", "") or ""))
            )
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{path}:{lineno}: expected a JSON object with 'input' and 'output': {exc}"
            ) from exc
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def split(
    records: Sequence[Record], eval_fraction: float = 0.1, seed: int = 0, max_eval: int | None = None
) -> tuple[list[Record], list[Record]]:
    """Deterministic shuffled split into (train, eval); eval is never empty when there are >= 2 records."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(records) * eval_fraction)) if len(records) > 1 else 0
    if max_eval is not None:
        n_eval = min(n_eval, max_eval)
    eval_idx, train_idx = order[:n_eval], order[n_eval:]
    return [records[i] for i in train_idx], [records[i] for i in eval_idx]


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return [int(i) for i in tokenizer(text, add_special_tokens=special)["input_ids"]]


class Formatter:
    """Turns text into the exact token ids the server would build, plus the training target."""

    def __init__(self, tokenizer: Any, chat: bool | None = None, system_prompt: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.chat = has_chat_template(tokenizer) if chat is None else chat
        if self.chat and not has_chat_template(tokenizer):
            raise ValueError("chat formatting was requested but the tokenizer has no chat template")
        if system_prompt is not None and not self.chat:
            raise ValueError("a system prompt needs the chat template (raw text has no system message)")
        self.system_prompt = system_prompt
        self.special_ids = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}

    @property
    def input_format(self) -> InputFormat:
        """What an artifact trained on these ids records: the chat template with its system prompt (None: no
        system message, the template's default) or the raw text."""
        return InputFormat(chat_template=self.chat, system_prompt=self.system_prompt)

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        text: str = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        return text

    def prompt_ids(self, text: str) -> list[int]:
        """The request: a chat user turn + generation prompt, or the plain prompt (server semantics)."""
        if self.chat:
            return _ids(self.tokenizer, self._render(task_messages(text, self.system_prompt), True), False)
        return _ids(self.tokenizer, text, True)

    def target_ids(self, text: str, output: str) -> list[int]:
        """The answer tokens up to and including the end-of-turn / EOS token."""
        eos = self.tokenizer.eos_token_id
        if self.chat:
            user = task_messages(text, self.system_prompt)
            prompt = self._render(user, True)
            full = self._render([*user, {"role": "assistant", "content": output}], False)
            if full.startswith(prompt):
                ids = _ids(self.tokenizer, full[len(prompt) :], False)
                ends = [i for i, t in enumerate(ids) if t in self.special_ids]
                if ends:
                    return ids[: ends[0] + 1]
                return ids + ([int(eos)] if eos is not None else [])
        ids = _ids(self.tokenizer, output, False)
        return ids + ([int(eos)] if eos is not None else [])

    def instruction_ids(self, instruction: str) -> list[int]:
        """Gist instruction tokens: the plain text, with the tokenizer's own special tokens (e.g. BOS)."""
        return _ids(self.tokenizer, instruction, True)

    def with_instruction(self, instruction: str, text: str) -> str:
        """The positive-control request: the full instruction written into the request itself."""
        return f"{instruction}\n\n{text}" if instruction else text


def tokenize(
    records: Iterable[Record],
    tokenizer: Any,
    chat: bool | None = None,
    max_length: int = 512,
    system_prompt: str | None = None,
) -> list[Tokenized]:
    """Tokenise records; rows longer than max_length (instruction + prompt + target) are dropped."""
    fmt = Formatter(tokenizer, chat, system_prompt)
    out = []
    for rec in records:
        prompt_ids = fmt.prompt_ids(rec.input)
        row = Tokenized(
            prompt_ids=tuple(prompt_ids),
            target_ids=tuple(fmt.target_ids(rec.input, rec.output)),
            instruction_ids=tuple(fmt.instruction_ids(rec.instruction)) if rec.instruction else (),
            # the server's offset for the same ids
            added_at=user_text_offset(tokenizer, prompt_ids, system_prompt),
        )
        if len(row.instruction_ids) + len(row.prompt_ids) + len(row.target_ids) <= max_length:
            out.append(row)
    if not out:
        raise ValueError(f"every example is longer than max_length={max_length} tokens")
    return out


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)  # [B, T]


def collate(examples: Sequence[Tokenized], pad_id: int) -> Batch:
    """Rows [prompt][target], right-padded; labels only on the target."""
    ids = [list(e.prompt_ids) + list(e.target_ids) for e in examples]
    labels = [[IGNORE] * len(e.prompt_ids) + list(e.target_ids) for e in examples]
    return Batch(
        input_ids=_pad(ids, pad_id),  # [B, T]
        attention_mask=_pad([[1] * len(r) for r in ids], 0),  # [B, T]
        labels=_pad(labels, IGNORE),  # [B, T]
        prompt_lengths=torch.tensor([len(e.prompt_ids) for e in examples]),  # [B]
        added_at=torch.tensor([e.added_at for e in examples]),  # [B]
    )


def collate_gist(examples: Sequence[Tokenized], pad_id: int, num_gist: int) -> Batch:
    """Rows [instruction][k gist slots][prompt][target], right-padded; slots hold pad_id (replaced later)."""
    ids, labels = [], []
    for e in examples:
        head = list(e.instruction_ids) + [pad_id] * num_gist + list(e.prompt_ids)
        ids.append(head + list(e.target_ids))
        labels.append([IGNORE] * len(head) + list(e.target_ids))
    return Batch(
        input_ids=_pad(ids, pad_id),  # [B, T]
        attention_mask=_pad([[1] * len(r) for r in ids], 0),  # [B, T]
        labels=_pad(labels, IGNORE),  # [B, T]
        prompt_lengths=torch.tensor([len(e.prompt_ids) for e in examples]),  # [B]
        gist_start=torch.tensor([len(e.instruction_ids) for e in examples]),  # [B]
        num_gist=num_gist,
    )


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (padding is always masked out)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(candidate, int):
            return candidate
    return 0
