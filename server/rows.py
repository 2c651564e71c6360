"""What a new batch row needs, prepared per request before the shared prefill: every check that could
otherwise fail the whole prefill group runs here, so a request that cannot run fails alone."""

from __future__ import annotations

from prompt_store import TaskKey
from prompt_store.lru import ByteLRU
from runtime.batch_state import PrefillItem
from runtime.model_runner import ModelRunner
from server.prefixes import DevicePrefix, device_prefix
from server.requests import GenerationRequest
from server.sampling import RowSampler, TextStream


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
    return PrefillItem(prefix.keys, prefix.values, prefix.next_position, ids, prefix.added)


def new_row(
    runner: ModelRunner,
    prefix_cache: ByteLRU[TaskKey, DevicePrefix],
    bare: DevicePrefix,
    req: GenerationRequest,
    prefixes: dict[TaskKey, DevicePrefix],
) -> tuple[PrefillItem, TextStream, RowSampler]:
    """The row's prefill item, its text stream (stop strings) and its sampler (penalty state, generator,
    logit bias checked against the vocabulary); raises for this request alone."""
    item = prefill_item(runner, prefix_cache, bare, req, prefixes)
    stream = TextStream(runner.decode, req.params.stop)
    sampler = RowSampler.create(req.params, runner.device, runner.fingerprint.vocab_size)
    return item, stream, sampler
