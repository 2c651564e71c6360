"""Device-side serving forms: each task version's KV prefix (+ next position, ACCEPT delta), cached by bytes.

An embedding prefix (prompt tuning, P-tuning, ACCEPT) runs through the model once per task version; a KV
prefix (prefix tuning, gist) is moved to the device once. Keys are TaskPrompt.key (task, version, sha256).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prompt_store import SoftPrompt, TaskKey, TaskPrompt
from prompt_store.lru import ByteLRU
from prompt_store.types import ADDED_AT_USER_TEXT
from runtime.model_runner import ModelRunner


@dataclass(frozen=True)
class DevicePrefix:
    """A task version's prefix on the engine's device: KV prefix, next position, optional ACCEPT delta."""

    keys: torch.Tensor  # [L, Hkv, m, Dh]
    values: torch.Tensor  # [L, Hkv, m, Dh]
    next_position: int
    added: torch.Tensor | None = None  # [s, d]
    added_at_user_text: bool = False  # the delta starts at the user text (runtime.input_format), not at 0

    def nbytes(self) -> int:
        parts = (self.keys, self.values, self.added)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def bare_prefix(runner: ModelRunner) -> DevicePrefix:
    """The empty prefix of bare-model rows (m = 0, positions from 0)."""
    keys, values = runner.prefix_kv(SoftPrompt())  # [L, Hkv, 0, Dh] each
    return DevicePrefix(keys, values, 0)


def device_prefix(
    runner: ModelRunner, cache: ByteLRU[TaskKey, DevicePrefix], task: TaskPrompt
) -> DevicePrefix:
    """The task version's device prefix from `cache`, converting (and checking) it on a miss."""
    cached = cache.get(task.key)
    if cached is not None:
        return cached
    return _store(runner, cache, task, runner.prefix_kv(task.prompt))


def device_prefixes(
    runner: ModelRunner, cache: ByteLRU[TaskKey, DevicePrefix], tasks: list[TaskPrompt]
) -> dict[TaskKey, DevicePrefix]:
    """Every task's device prefix, converting the ones missing from `cache`; the missing embedding prefixes
    run through the model in one batched forward (not one each), so many cold tasks cost one pass.

    A task whose prefix fails its checks is left out; `device_prefix` then raises for its own request.
    """
    found: dict[TaskKey, DevicePrefix] = {}
    missing: dict[TaskKey, TaskPrompt] = {}
    for task in tasks:
        if task.key in found or task.key in missing:
            continue
        cached = cache.get(task.key)
        if cached is not None:
            found[task.key] = cached
        else:
            missing[task.key] = task
    embedding = {key: t.prompt.embeds for key, t in missing.items() if _is_embedding_prefix(t.prompt)}
    batched: dict[TaskKey, tuple[torch.Tensor, torch.Tensor]] = {}
    if len(embedding) > 1:
        kvs = runner.embedding_prefix_kvs([e for e in embedding.values() if e is not None])
        batched = dict(zip(embedding, kvs, strict=True))  # [L, Hkv, m_i, Dh] each
    for key, task in missing.items():
        try:
            kv = batched[key] if key in batched else runner.prefix_kv(task.prompt)
            found[key] = _store(runner, cache, task, kv)
        except ValueError:
            continue
    return found


def _is_embedding_prefix(prompt: SoftPrompt) -> bool:
    return prompt.keys is None and prompt.embeds is not None and prompt.embeds.shape[0] > 0


def _store(
    runner: ModelRunner,
    cache: ByteLRU[TaskKey, DevicePrefix],
    task: TaskPrompt,
    kv: tuple[torch.Tensor, torch.Tensor],  # [L, Hkv, m, Dh] each
) -> DevicePrefix:
    prompt = task.prompt
    added = None if prompt.added is None else prompt.added.to(runner.device, runner.dtype)  # [s, d]
    at_user = prompt.added_at == ADDED_AT_USER_TEXT
    entry = DevicePrefix(kv[0], kv[1], int(prompt.next_position), added, at_user)
    check_prefix(entry, runner)
    return cache.put(task.key, entry, entry.nbytes())


def check_prefix(entry: DevicePrefix, runner: ModelRunner) -> None:
    """Shapes the engine relies on (a bad prefix must fail its own request, not a whole prefill)."""
    want = (runner.num_layers, runner.num_kv_heads, runner.head_dim)
    got = (entry.keys.shape[0], entry.keys.shape[1], entry.keys.shape[3]) if entry.keys.dim() == 4 else ()
    if got != want or entry.values.shape != entry.keys.shape:
        shape = list(entry.keys.shape)
        raise ValueError(f"KV prefix has shape {shape}; this model needs [L, Hkv, m, Dh] with {want}")
    if entry.added is not None and (entry.added.dim() != 2 or entry.added.shape[1] != runner.hidden_size):
        shape = list(entry.added.shape)
        raise ValueError(f"added delta has shape {shape}; expected [s, {runner.hidden_size}]")
    if entry.next_position < entry.keys.shape[2]:
        raise ValueError("next_position is smaller than the prefix length")
