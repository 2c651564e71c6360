"""Detokenisation benchmark: `TextStream.push` cost per token at token 16 and at token 1,024, old vs new.

Old: decode every generated id at every token (O(n) per token). New: server/sampling.py's incremental
stream (prefix/read offsets, O(1) per token). Both run side by side in one process, on the SmolLM2
tokenizer (offline, tokenizer only), over the same 1,024 ids (English, emoji and CJK, split across tokens),
with two stop strings that never match. Wall time per push (perf_counter_ns), median over windows of
16 tokens and --repeats runs. Host work only: --device is accepted for uniformity and ignored.
Writes bench/results/detok.md and .json. Goal: new cost at token 1,024 / cost at token 16 <= 1.5.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import Goal, add_device_args, write_report  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from prompt_store.embedded_model import ensure_smollm2  # noqa: E402
from server.sampling import REPLACEMENT_CHAR, TextStream  # noqa: E402

TEXT = "The cat sat on the mat 🎉, then said 你好世界 to everyone. Numbers: 3.14159 and naïve café!\n"
STOPS = ("\n\nUser:", "###END###")
N = 1024
WINDOW = 16


class OldTextStream:
    """The previous algorithm: decode(ids) at every token, search the whole held text."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode, self.stop = decode, tuple(s for s in stop if s)
        self._longest = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.text, self.emitted = "", 0

    def push(self, token_id: int) -> tuple[str, bool]:
        self.ids.append(token_id)
        self.text = self._decode(self.ids)
        hits = [i for i in (self.text.find(s, self.emitted) for s in self.stop) if i >= 0]
        if hits:
            out, self.text = self.text[self.emitted : min(hits)], self.text[: min(hits)]
            self.emitted = len(self.text)
            return out, True
        end = len(self.text)
        while end > 0 and self.text[end - 1] == REPLACEMENT_CHAR:
            end -= 1
        for k in range(min(self._longest - 1, end), 0, -1):
            if any(s.startswith(self.text[end - k : end]) for s in self.stop):
                end -= k
                break
        out = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out, False


def push_costs(make: Callable[[], TextStream | OldTextStream], ids: list[int], repeats: int) -> list[float]:
    """Per token position: the median push wall time in microseconds over `repeats` runs."""
    runs = []
    for _ in range(repeats):
        stream, costs = make(), []
        for token in ids:
            t0 = time.perf_counter_ns()
            stream.push(token)
            costs.append((time.perf_counter_ns() - t0) / 1e3)
        runs.append(costs)
    return [statistics.median(r[i] for r in runs) for i in range(len(ids))]


def at(costs: list[float], token: int) -> float:
    """Median cost over the WINDOW tokens ending at `token` (1-based)."""
    return statistics.median(costs[max(0, token - WINDOW) : token])


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    add_device_args(parser)
    parser.add_argument("--repeats", type=int, default=5, help="runs of 1,024 pushes per stream kind")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    tok = AutoTokenizer.from_pretrained(ensure_smollm2(), local_files_only=True)

    def decode(chunk: list[int]) -> str:  # as ModelRunner.decode
        return str(tok.decode(chunk, skip_special_tokens=True))

    ids = (tok(TEXT, add_special_tokens=False)["input_ids"] * N)[:N]
    new = push_costs(lambda: TextStream(decode, STOPS), ids, args.repeats)
    old = push_costs(lambda: OldTextStream(decode, STOPS), ids, args.repeats)
    kinds = (("old (decode all ids)", old), ("new (incremental)", new))
    rows = {name: (at(c, 16), at(c, N)) for name, c in kinds}
    lines = [
        "# Detokenisation: TextStream.push cost per token",
        "",
        f"SmolLM2 tokenizer, {N} ids of mixed English/emoji/CJK text, stops {list(STOPS)} (never matched); "
        f"median of {args.repeats} runs and of {WINDOW}-token windows; wall time, host only.",
        "",
        "| stream | µs/token at token 16 | µs/token at token 1,024 | growth (1,024 / 16) |",
        "|---|---:|---:|---:|",
    ]
    for name, (a, b) in rows.items():
        lines.append(f"| {name} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")
    (new16, new1k), old1k = rows["new (incremental)"], rows["old (decode all ids)"][1]
    lines += ["", f"At token 1,024 the new stream costs {old1k / new1k:.1f}x less per token than the old."]
    growth = new1k / new16
    measure = "detok: new push cost at token 1,024 / at token 16"
    goals = [Goal(measure, "<= 1.5", f"{growth:.2f}", growth <= 1.5)]
    data = {"n": N, "repeats": args.repeats, "summary": rows}
    data |= {"old_us": [round(c, 2) for c in old], "new_us": [round(c, 2) for c in new]}
    write_report("detok", "\n".join(lines), goals, data)


if __name__ == "__main__":
    main()
