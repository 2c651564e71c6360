"""Scoring and baselines for bench/methods_real.py: exact match after normalisation, label log-likelihood
accuracy (classification), in-context prompts, and LoRA (PEFT) on a copy of the frozen base.

Every score runs through the runtime's prefill/decode (`runtime.batch_state`), i.e. what the server
computes: greedy answers for exact match; for label log-likelihood each label's answer tokens (the label
and the end-of-turn token) are teacher-forced after the request and summed, and the best label is the
prediction.
"""

from __future__ import annotations

import copy
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save as st_save

from prompt_store import SoftPrompt
from runtime.batch_state import decode_one_token, prefill
from runtime.generate import prefill_items
from runtime.model_runner import ModelRunner
from training.data import Formatter, Record, collate, pad_token_id, tokenize
from training.eval import predict
from training.loop import batch_indices, lr_factor

_PUNCT = re.compile(r"[\s.,;:!?\"'()\[\]]+$")


def normalize(text: str) -> str:
    """Lower-cased, whitespace-collapsed, trailing punctuation dropped ("Positive." == "positive")."""
    return _PUNCT.sub("", " ".join(text.lower().split())).strip()


@dataclass
class Score:
    exact_match: float
    label_accuracy: float | None  # None for generation tasks
    n: int
    samples: list[dict[str, str]]


def label_loglik(
    runner: ModelRunner,
    prompt: SoftPrompt | None,
    rows: Sequence[Sequence[int]],
    label_ids: Sequence[Sequence[int]],
    batch_size: int,
) -> torch.Tensor:
    """Summed log-probability [N, C] of each label's answer tokens after each request (teacher-forced)."""
    out = torch.zeros(len(rows), len(label_ids))  # [N, C]
    with torch.inference_mode():
        for lo in range(0, len(rows), batch_size):
            chunk = rows[lo : lo + batch_size]
            for c, ids in enumerate(label_ids):
                state, logits = prefill(runner, prefill_items(runner, prompt, chunk))  # [G, V]
                total = torch.zeros(len(chunk))  # [G]
                for j, tok in enumerate(ids):
                    total += torch.log_softmax(logits.float(), dim=-1)[:, tok].cpu()  # [G]
                    if j + 1 < len(ids):
                        logits = decode_one_token(runner, state, [tok] * len(chunk))  # [G, V]
                out[lo : lo + len(chunk), c] = total
    return out


def score_groups(
    runner: ModelRunner,
    groups: Sequence[tuple[SoftPrompt | None, list[str], list[Record]]],
    labels: Sequence[str],
    batch_size: int,
    max_new_tokens: int,
) -> Score:
    """Score records in groups that share a serving form: (prompt, request texts, records)."""
    fmt = Formatter(runner.tokenizer)
    label_ids = [fmt.target_ids("x", lab) for lab in labels]
    em, hits, n, samples = 0, 0, 0, []
    for prompt, texts, records in groups:
        rows = [fmt.prompt_ids(t) for t in texts]
        preds = predict(runner, runner.tokenizer, rows, prompt, max_new_tokens, batch_size)
        for rec, p in zip(records, preds, strict=True):
            em += normalize(p) == normalize(rec.output)
            if len(samples) < 4:
                samples.append({"input": rec.input[:80], "prediction": p, "reference": rec.output})
        if labels:
            ll = label_loglik(runner, prompt, rows, label_ids, batch_size)  # [N, C]
            best = ll.argmax(dim=1).tolist()
            hits += sum(labels[b] == rec.output for b, rec in zip(best, records, strict=True))
        n += len(records)
    return Score(em / max(1, n), hits / max(1, n) if labels else None, n, samples)


def few_shot_text(instruction: str, shots: Sequence[Record], text: str) -> str:
    """The in-context request: the instruction, k solved examples, then the query (one user turn)."""
    body = "".join(f"Input: {s.input}\nAnswer: {s.output}\n\n" for s in shots)
    return f"{instruction}\n\n{body}Input: {text}\nAnswer:"


def pick_shots(train: Sequence[Record], labels: Sequence[str], k: int, seed: int) -> list[Record]:
    """k training examples, seeded; for classification one per label first (as far as k allows)."""
    rng = random.Random(seed)
    pool = list(train)
    rng.shuffle(pool)
    shots: list[Record] = []
    for lab in labels[:k]:
        shots += [r for r in pool if r.output == lab][:1]
    shots += [r for r in pool if r not in shots][: k - len(shots)]
    rng.shuffle(shots)
    return shots


@dataclass
class LoraRun:
    runner: ModelRunner
    params: int
    artifact_bytes: int
    losses: list[float]


def train_lora(
    base: ModelRunner,
    records: Sequence[Record],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    rank: int = 8,
) -> LoraRun:
    """LoRA (q_proj, v_proj, rank 8) through PEFT on a deep copy of the frozen base (the base is never
    touched), same tokenisation and loss as the soft-prompt trainers; merged for evaluation."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    torch.manual_seed(seed)
    model = copy.deepcopy(base.model)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    peft_model: Any = get_peft_model(model, cfg)
    peft_model.train()
    tok = base.tokenizer
    examples = tokenize(records, tok)
    pad = pad_token_id(tok)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * lr_factor(step, steps, max(1, steps // 10))
        batch = collate([examples[i] for i in batch_indices(len(examples), batch_size, seed, step)], pad)
        out = peft_model(
            input_ids=batch.input_ids.to(base.device),  # [B, T]
            attention_mask=batch.attention_mask.to(base.device),  # [B, T]
            labels=batch.labels.to(base.device),  # [B, T]
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
    params = sum(p.numel() for p in trainable)
    nbytes = len(st_save({k: v.contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}))
    merged = peft_model.merge_and_unload().eval()
    return LoraRun(ModelRunner.from_model(merged, tok, base.name + "+lora"), params, nbytes, losses)
