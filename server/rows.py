"""What a new batch row needs, prepared per request before the shared prefill: every check that could
otherwise fail the whole prefill group runs here, so a request that cannot run fails alone."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from prompt_store import TaskKey
from prompt_store.lru import ByteLRU
from runtime.batch_state import PrefillItem
from runtime.input_format import user_text_offset
from runtime.model_runner import ModelRunner
from runtime.prompt_cache import Lookup, PromptCache, root_id
from server.prefixes import DevicePrefix, device_prefix
from server.requests import GenerationRequest, TokenEvent
from server.sampling import RowSampler, Sampled
from server.text_stream import TextStream
from server.waiting import Pending

log = logging.getLogger("softserve.engine")


def prefill_item(
    runner: ModelRunner,
    prefix_cache: ByteLRU[TaskKey, DevicePrefix],
    bare: DevicePrefix,
    req: GenerationRequest,
    prefixes: dict[TaskKey, DevicePrefix],
) -> PrefillItem:
    """The row's prompt ids (checked against the vocabulary), its prefix and whether they fit the context."""
    ids = list(req.prompt_ids)
    if not ids:
        raise ValueError("the prompt is empty")
    vocab = runner.fingerprint.vocab_size
    if min(ids) < 0 or max(ids) >= vocab:
        raise ValueError(f"prompt token ids must be in [0, {vocab})")
    if req.task is None:
        prefix = bare
    else:
        prefix = prefixes.get(req.task.key) or device_prefix(runner, prefix_cache, req.task)
    if prefix.next_position + len(ids) > runner.max_context:
        raise ValueError(
            f"prompt ({len(ids)} tokens) starting at position {prefix.next_position} exceeds the model "
            f"context of {runner.max_context}"
        )
    at = 0
    if prefix.added_at_user_text and req.task is not None:  # under the task's system prompt (its head)
        at = user_text_offset(runner.tokenizer, ids, req.task.input_format.system_prompt)
    return PrefillItem(prefix.keys, prefix.values, prefix.next_position, ids, prefix.added, at)


def new_row(
    runner: ModelRunner,
    prefix_cache: ByteLRU[TaskKey, DevicePrefix],
    bare: DevicePrefix,
    pending: Pending,
    prefixes: dict[TaskKey, DevicePrefix],
    prompt_cache: PromptCache,
    capacity: int,
    single_decodes: dict[int, str] | None = None,
) -> tuple[Row, PrefillItem]:
    """The row (text stream with stop strings; sampler with penalty state, generator and logit bias checked
    against the vocabulary) and its prefill item, with the prompt's cached blocks moved into its prefix;
    raises for this request alone. `single_decodes`: a decode([id]) cache shared by the engine's streams."""
    req = pending.req
    item = prefill_item(runner, prefix_cache, bare, req, prefixes)
    if item.length > capacity:
        raise ValueError(
            f"prompt ({len(item.ids)} tokens) after the task's {item.prefix_len} virtual tokens exceeds the "
            f"KV row capacity of {capacity} tokens"
        )
    stream = TextStream(runner.decode, req.params.stop, single_decodes)
    sampler = RowSampler.create(req.params, runner.device, runner.fingerprint.vocab_size)
    found = prompt_cache.lookup(root_id(req.task.key if req.task else None), item.ids)
    req.cached_tokens = found.cached_tokens
    row = Row(pending, stream, sampler, item.next_position + len(item.ids), item.length, found)
    return row, prompt_cache.extend(item, found)


@dataclass
class Row:
    """A request while it is in the running batch (the engine's row b lives in KV slot b)."""

    pending: Pending
    stream: TextStream
    sampler: RowSampler  # params, generator, penalty counts
    next_pos: int  # position id the next fed token gets
    columns: int  # KV columns the row holds once its last sampled token is fed
    lookup: Lookup  # its prompt's blocks in the prompt cache
    tokens: list[int] = field(default_factory=list)
    finished: bool = False
    max_new_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.max_new_tokens = self.pending.req.params.max_new_tokens

    @property
    def req(self) -> GenerationRequest:
        return self.pending.req

    def accept(
        self, sampled: Sampled | Exception, eos_ids: Any, max_context: int, capacity: int
    ) -> TokenEvent:
        """The row's event for its sampled token: a final one when the row ends with it (EOS, a stop string,
        max_new_tokens, the model context or its KV capacity), or when sampling or decoding failed."""
        if isinstance(sampled, Exception):
            req = self.req
            log.warning("request %d: sampling failed: %s", req.request_id, sampled, extra=req.log_extra)
            error = f"sampling failed: {type(sampled).__name__}: {sampled}"[:300]
            return TokenEvent(None, "", finish_reason="error", error=error)
        token = sampled.token
        tokens = self.tokens
        tokens.append(token)
        if token in eos_ids:  # never fed back: the row ends here
            return TokenEvent(None, self.stream.flush(), finish_reason="stop")
        try:
            text, stopped = self.stream.push(token)
            if stopped:
                event = TokenEvent(token, text, finish_reason="stop")
            elif (
                len(tokens) >= self.max_new_tokens
                or self.next_pos >= max_context
                or (self.columns >= capacity)
            ):
                event = TokenEvent(token, text + self.stream.flush(), finish_reason="length")
            else:
                event = TokenEvent(token, text)
        except Exception as exc:  # e.g. the tokenizer cannot decode: this row alone fails
            req = self.req
            log.exception("request %d: decoding its text failed", req.request_id, extra=req.log_extra)
            event = TokenEvent(None, "", finish_reason="error", error=f"decode failed: {type(exc).__name__}")
        return event if sampled.logprob is None else sampled.annotate(event)  # its log-probs, when asked
