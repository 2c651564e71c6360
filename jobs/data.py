"""Training files: OpenAI's chat JSONL (`{"messages": [...]}`, the last assistant turn is the target) or
`{"prompt", "completion"}` lines. Every line is checked at upload; a refusal names the line and the reason.

A chat line becomes one (input, output) example: input = the last user turn before the final assistant
turn (a system turn before it is kept as its instruction), output = that assistant turn's content.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "developer", "user", "assistant")


class BadFile(ValueError):
    """A training file refused at upload: `line` (1-based, 0 for the file as a whole) and the reason."""

    def __init__(self, line: int, reason: str) -> None:
        where = f"line {line}: " if line else ""
        super().__init__(f"{where}{reason}")
        self.line = line
        self.reason = reason


@dataclass(frozen=True)
class Example:
    input: str
    output: str
    instruction: str = ""


def _text(value: Any, line: int, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text", "")) for p in value)  # content parts: text only
    raise BadFile(line, f"{where} must be a string (or a list of text parts)")


def parse_line(row: Any, line: int) -> Example:
    if not isinstance(row, dict):
        raise BadFile(line, "expected a JSON object")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or len(messages) < 2:
            raise BadFile(line, "'messages' must be a list of at least a user and an assistant message")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise BadFile(line, f"messages[{i}].role must be one of {', '.join(ROLES)}")
            if "content" not in m:
                raise BadFile(line, f"messages[{i}] has no 'content'")
        if messages[-1]["role"] != "assistant":
            raise BadFile(line, "the last message must be the assistant's (the target)")
        users = [i for i, m in enumerate(messages[:-1]) if m["role"] == "user"]
        if not users:
            raise BadFile(line, "no user message before the final assistant message")
        system = [m for m in messages[: users[-1]] if m["role"] in ("system", "developer")]
        return Example(
            input=_text(messages[users[-1]]["content"], line, f"messages[{users[-1]}].content"),
            output=_text(messages[-1]["content"], line, f"messages[{len(messages) - 1}].content"),
            instruction=_text(system[-1]["content"], line, "system content") if system else "",
        )
    if "prompt" in row and "completion" in row:
        return Example(
            input=_text(row["prompt"], line, "'prompt'"),
            output=_text(row["completion"], line, "'completion'"),
        )
    raise BadFile(line, 'expected {"messages": [...]} or {"prompt": ..., "completion": ...}')


def parse_jsonl(data: bytes, max_lines: int | None = None) -> list[Example]:
    """Every non-blank line as an Example; BadFile names the first bad line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise BadFile(line, "not valid UTF-8") from None
    out: list[Example] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        if max_lines is not None and len(out) >= max_lines:
            raise BadFile(lineno, f"more than {max_lines} examples (SOFTSERVE_FILE_MAX_LINES)")
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise BadFile(lineno, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
        example = parse_line(row, lineno)
        if not example.output:
            raise BadFile(lineno, "the target (assistant content / completion) is empty")
        out.append(example)
    if not out:
        raise BadFile(0, "the file holds no examples")
    return out
