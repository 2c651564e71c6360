"""Held-out evaluation with greedy decoding: exact match (accuracy) and ROUGE-L (LCS-based F1).

Artifacts are evaluated through their serving form (`prompt_store.to_serving_form`), decoded by the
engine's own prefill/decode (`runtime.generate`), so predictions are what the server's /generate returns.
Gist embeddings are evaluated by compressing each instruction (`runtime.gist.compress`), next to two
controls on the bare model: the full instruction written into the request (positive) and no instruction
at all (negative).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from prompt_store import Artifact, SoftPrompt, to_serving_form
from runtime.gist import compress
from training.data import Formatter, Record
from training.generate import greedy_generate
from training.model import runner_for


def normalize(text: str) -> str:
    """Whitespace-collapsed, stripped text (case is kept: it matters for style tasks)."""
    return " ".join(text.split())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len(a) * len(b)) time)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased whitespace tokens (1.0 when both are empty)."""
    p, r = prediction.lower().split(), reference.lower().split()
    if not p and not r:
        return 1.0
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


@dataclass
class EvalResult:
    exact_match: float
    rouge_l: float
    n: int
    samples: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score(
    predictions: Sequence[str], references: Sequence[str], inputs: Sequence[str] = (), keep: int = 5
) -> EvalResult:
    """Exact match and mean ROUGE-L of predictions against references; keeps a few samples."""
    n = len(references)
    em = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references, strict=True))
    rl = sum(rouge_l(p, r) for p, r in zip(predictions, references, strict=True))
    samples = [
        {
            "input": inputs[i] if i < len(inputs) else "",
            "prediction": predictions[i],
            "reference": references[i],
        }
        for i in range(min(keep, n))
    ]
    return EvalResult(exact_match=em / max(1, n), rouge_l=rl / max(1, n), n=n, samples=samples)


def default_max_new_tokens(tokenizer: Any, records: Sequence[Record]) -> int:
    """Longest reference answer in tokens, plus room for the end token."""
    longest = max(len(tokenizer(r.output, add_special_tokens=False)["input_ids"]) for r in records)
    return longest + 4


def predict_ids(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    prompt: SoftPrompt | None,
    max_new_tokens: int,
    batch_size: int = 8,
) -> list[list[int]]:
    """Greedy answer ids of requests under one serving form, each ending at (and keeping) its first stop id
    (the runtime's `eos_ids`); `model` is a `ModelRunner`, `LoadedModel` or bare HF model."""
    runner = runner_for(model, tokenizer)
    return greedy_generate(runner, prompt_ids, prompt, max_new_tokens, set(runner.eos_ids), batch_size)


def predict(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    prompt: SoftPrompt | None,
    max_new_tokens: int,
    batch_size: int = 8,
) -> list[str]:
    """Greedy answers (decoded, special tokens dropped) of requests under one serving form."""
    outs = predict_ids(model, tokenizer, prompt_ids, prompt, max_new_tokens, batch_size)
    return [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]


def evaluate(
    model: Any,
    tokenizer: Any,
    records: Sequence[Record],
    prompt: SoftPrompt | None = None,
    *,
    chat: bool | None = None,
    system_prompt: str | None = None,
    with_instruction: bool = False,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
) -> EvalResult:
    """Score greedy answers to `records` under `prompt` (None = the bare model).

    with_instruction writes each record's instruction into the request (the gist positive control).
    """
    fmt = Formatter(tokenizer, chat, system_prompt)
    texts = [fmt.with_instruction(r.instruction, r.input) if with_instruction else r.input for r in records]
    ids = [fmt.prompt_ids(t) for t in texts]
    new = max_new_tokens or default_max_new_tokens(tokenizer, records)
    preds = predict(model, tokenizer, ids, prompt, new, batch_size)
    return score(preds, [r.output for r in records], [r.input for r in records])


def evaluate_gist(
    model: Any,
    tokenizer: Any,
    gist_embeddings: torch.Tensor | Artifact,
    records: Sequence[Record],
    *,
    chat: bool | None = None,
    system_prompt: str | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    model_name: str = "",
) -> dict[str, EvalResult]:
    """Gist (each instruction compressed, served from its `gist` artifact) and the two controls."""
    new = max_new_tokens or default_max_new_tokens(tokenizer, records)
    fmt = Formatter(tokenizer, chat, system_prompt)
    runner = runner_for(model, tokenizer, model_name)
    preds = [""] * len(records)
    for instruction in sorted({r.instruction for r in records}):
        art = compress(runner, gist_embeddings, instruction, "gist")
        rows = [i for i, r in enumerate(records) if r.instruction == instruction]
        ids = [fmt.prompt_ids(records[i].input) for i in rows]
        for i, p in zip(
            rows, predict(runner, tokenizer, ids, to_serving_form(art), new, batch_size), strict=True
        ):
            preds[i] = p
    kw: dict[str, Any] = {"chat": chat, "system_prompt": system_prompt, "max_new_tokens": new}
    kw["batch_size"] = batch_size
    return {
        "gist": score(preds, [r.output for r in records], [r.input for r in records]),
        "positive_control": evaluate(runner, tokenizer, records, None, with_instruction=True, **kw),
        "negative_control": evaluate(runner, tokenizer, records, None, **kw),
    }


def evaluate_artifact(
    model: Any,
    tokenizer: Any,
    artifact: Artifact,
    records: Sequence[Record],
    *,
    baseline: bool = True,
    model_name: str = "",
    **kwargs: Any,
) -> dict[str, EvalResult]:
    """`gist_embedding` -> gist + controls; other methods -> `after` (+ `before`: no prompt), in the
    artifact's recorded input format unless `chat` is given."""
    runner = runner_for(model, tokenizer, model_name)
    if artifact.manifest.method == "gist_embedding":
        return evaluate_gist(runner, tokenizer, artifact, records, model_name=model_name, **kwargs)
    if kwargs.get("chat") is None:  # evaluated in the input format the server applies to its prompts
        kwargs["chat"] = artifact.manifest.input_format.chat_template
        if kwargs["chat"] and kwargs.get("system_prompt") is None:
            kwargs["system_prompt"] = artifact.manifest.input_format.system_prompt
    out = {"after": evaluate(runner, tokenizer, records, to_serving_form(artifact), **kwargs)}
    if baseline:
        out["before"] = evaluate(runner, tokenizer, records, None, **kwargs)
    return out
