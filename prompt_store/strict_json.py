"""JSON as the store reads and writes it: finite numbers, 64-bit integers, text that is valid UTF-8.

Python's json accepts NaN/Infinity, integers of any size and lone surrogates ("\\ud800"); none of those can be
stored, served or echoed back in a JSON response, so they are refused here with a ValueError that names what.
"""

from __future__ import annotations

import json
import math
from typing import Any

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number (only finite numbers are accepted)")


def _bounded_int(text: str) -> int:
    value = int(text)  # Python's own digit limit raises ValueError first for absurd lengths
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"integer {text[:24]}... does not fit in 64 bits")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:24]} is out of range (only finite numbers are accepted)")
    return value


def loads(raw: str | bytes) -> Any:
    """json.loads that refuses NaN/Infinity, out-of-range numbers and lone surrogates (ValueError)."""
    value = json.loads(raw, parse_constant=_no_constant, parse_int=_bounded_int, parse_float=_finite_float)
    problem = text_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def dumps(value: Any) -> str:
    """Compact, key-sorted, non-ASCII kept as is: the stored form is no longer than what was sent."""
    problem = text_problem(value)
    if problem:
        raise ValueError(problem)
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def shown(text: str, limit: int = 40) -> str:
    """`text` fit for an error message: cut to `limit` characters, surrogates and controls escaped."""
    return text[:limit].encode("unicode_escape").decode("ascii")


def text_problem(value: Any) -> str | None:
    """Why `value` (a JSON-like tree) cannot be encoded as UTF-8 JSON, or None (iterative: any depth)."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return f"{path or 'value'} holds text that is not valid Unicode ('{shown(item)}')"
        elif isinstance(item, float) and not math.isfinite(item):
            return f"{path or 'value'} is {item}; only finite numbers are accepted"
        elif isinstance(item, dict):
            for key, sub in item.items():
                key_text = shown(str(key), 64)
                name = f"{path}.{key_text}" if path else key_text
                stack.append((name, key))
                stack.append((name, sub))
        elif isinstance(item, list | tuple):
            stack.extend((f"{path}[{i}]", sub) for i, sub in enumerate(item))
    return None
