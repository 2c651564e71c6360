"""Greedy decoding through the engine's own prefill/decode (`runtime.batch_state`), for training's evaluation.

The rows of one call run as one batch: `prefill` over their KV prefixes and prompts, then one
`decode_one_token` per step, each row taking the argmax. A row stops at its first stop id (kept in its
output); finished rows are fed their stop id until every row is done, which leaves the others unchanged.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from prompt_store import SoftPrompt
from prompt_store.types import ADDED_AT_USER_TEXT
from runtime.batch_state import PrefillItem, decode_one_token, prefill
from runtime.input_format import user_text_offset
from runtime.model_runner import ModelRunner


def prefill_items(
    runner: ModelRunner, prompt: SoftPrompt | None, rows: Sequence[Sequence[int]]
) -> list[PrefillItem]:
    """One `PrefillItem` per row of prompt ids under one serving form (None = the bare model): its KV prefix
    (`ModelRunner.prefix_kv`, computed once), next position and ACCEPT delta (at the user text when the
    artifact says so), as the server builds them."""
    prompt = prompt or SoftPrompt()
    keys, values = runner.prefix_kv(prompt)  # [L, Hkv, m, Dh] each
    added = None if prompt.added is None else prompt.added.to(runner.device, runner.dtype)  # [s, d]
    at_user = added is not None and prompt.added_at == ADDED_AT_USER_TEXT
    return [
        PrefillItem(
            keys,
            values,
            int(prompt.next_position),
            [int(i) for i in ids],
            added,
            user_text_offset(runner.tokenizer, ids) if at_user else 0,
        )
        for ids in rows
    ]


@torch.inference_mode()
def greedy(
    runner: ModelRunner, items: list[PrefillItem], max_new_tokens: int, stop_ids: Collection[int]
) -> list[list[int]]:
    """Greedy continuations of `items` (one batch), at most `max_new_tokens` each, stop ids kept."""
    if not items or max_new_tokens <= 0:
        return [[] for _ in items]
    out: list[list[int]] = [[] for _ in items]
    done = [False] * len(items)
    state, logits = prefill(runner, items)  # logits [B, V]
    for step in range(max_new_tokens):
        tokens = [int(t) for t in logits.argmax(dim=-1).tolist()]  # one device -> host copy per step
        for b, token in enumerate(tokens):
            if not done[b]:
                out[b].append(token)
                done[b] = token in stop_ids
        if all(done) or step == max_new_tokens - 1:
            break
        logits = decode_one_token(runner, state, [o[-1] for o in out])  # [B, V]
    return out
