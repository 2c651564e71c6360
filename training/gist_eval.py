"""Evaluation of gist compression (bench/gist_compression.py): ROUGE-L of greedy answers and target
log-likelihood, for one instruction under several conditions - no instruction (negative control), the full
instruction (positive control), its gist KV, or the gist KV of another task's instruction (swapped)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from runtime.gist import gist_kv, instruction_ids
from runtime.model_runner import KV, ModelRunner
from training.gist_tasks import prompt_text, target_text
from training.methods.gist_compressor import request_ids, row_logits, target_ids, target_positions


@dataclass(frozen=True)
class Condition:
    """What the frozen LM reads before the request: nothing, instruction ids, or a gist KV at `start`."""

    prefix: tuple[int, ...] = ()
    kv: KV | None = None
    start: int = 0


def full_instruction(runner: ModelRunner, instruction: str) -> Condition:
    return Condition(prefix=tuple(instruction_ids(runner, instruction)))


def gist_condition(runner: ModelRunner, instruction: str, gists: torch.Tensor, view: object) -> Condition:
    """The gist KV of `instruction` exactly as POST /tasks/{id}/compress stores it (runtime.gist.gist_kv)."""
    ids = instruction_ids(runner, instruction)
    kv = gist_kv(runner, ids, gists, model=view)  # [L, Hkv, k, Dh] each
    return Condition(kv=kv, start=len(ids) + int(gists.shape[0]))


@torch.inference_mode()
def greedy(
    runner: ModelRunner, cond: Condition, ids: list[int], max_new: int, stop_at_newline: bool = False
) -> list[int]:
    """Greedy tokens after `ids` under `cond` (stops at an end-of-sequence id, which is not returned, and
    with `stop_at_newline` once the answer text has a line break)."""
    seq, out = list(ids), []
    for _ in range(max_new):
        logits = row_logits(runner, [seq], cond.kv, cond.start, cond.prefix)[0]  # [V]
        tok = int(logits.argmax())
        if tok in runner.eos_ids:
            break
        out.append(tok)
        seq.append(tok)
        if stop_at_newline and "\n" in runner.decode(out).lstrip():
            break
    return out


@torch.inference_mode()
def target_logprob(runner: ModelRunner, cond: Condition, examples: Sequence[tuple[str, str]]) -> list[float]:
    """Mean per-token log-probability of each example's target under `cond`."""
    reqs = [request_ids(runner, prompt_text(x)) for x, _ in examples]
    tgts = [target_ids(runner, target_text(y)) for _, y in examples]
    b, c = target_positions(reqs, tgts)  # [N] each
    rows = [r + t for r, t in zip(reqs, tgts, strict=True)]
    logits = row_logits(runner, rows, cond.kv, cond.start, cond.prefix, at=(b, c))  # [N, V]
    labels = torch.tensor([tok for t in tgts for tok in t], device=logits.device)  # [N]
    lp = torch.log_softmax(logits, -1).gather(1, labels[:, None])[:, 0]  # [N]
    out, i = [], 0
    for t in tgts:
        out.append(float(lp[i : i + len(t)].mean()))
        i += len(t)
    return out


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased whitespace words (longest common subsequence)."""
    a, b = candidate.lower().split(), reference.lower().split()
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def answer_text(runner: ModelRunner, tokens: list[int]) -> str:
    """The generated answer up to its first line break."""
    return runner.decode(tokens).strip().split("\n")[0].strip()


def score(
    runner: ModelRunner, cond: Condition, examples: Sequence[tuple[str, str]], max_new: int
) -> tuple[list[float], list[float]]:
    """(ROUGE-L per example, target log-likelihood per example) under `cond`."""
    rouge = []
    for x, y in examples:
        tokens = greedy(runner, cond, request_ids(runner, prompt_text(x)), max_new, stop_at_newline=True)
        rouge.append(rouge_l(answer_text(runner, tokens), y))
    return rouge, target_logprob(runner, cond, examples)


def gap_closed(value: float, negative: float, positive: float) -> float:
    """(value - negative) / (positive - negative); nan when the controls do not differ."""
    gap = positive - negative
    return (value - negative) / gap if abs(gap) > 1e-9 else float("nan")
