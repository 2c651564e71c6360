"""Shared helpers for the store and cache tests: a tiny fingerprint and artifact builders per method."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from prompt_store import Artifact, Fingerprint, make_artifact
from prompt_store.backends import ChangeEvent, Store

# hidden 8, 2 layers, 2 kv heads of dim 4, vocab 32: every method's tensors stay a few hundred bytes.
FP = Fingerprint(
    name="tiny",
    hidden_size=8,
    num_layers=2,
    num_kv_heads=2,
    head_dim=4,
    vocab_size=32,
    embedding_hash="e" * 32,
)
L, HKV, DH, D = FP.num_layers, FP.num_kv_heads, FP.head_dim, FP.hidden_size

# method -> (method_config, {tensor name: shape})
SPECS: dict[str, tuple[dict[str, Any], dict[str, tuple[int, ...]]]] = {
    "prompt_tuning": ({"num_virtual_tokens": 3}, {"prompt": (3, D)}),  # [m, d]
    "p_tuning": ({"num_virtual_tokens": 3, "encoder_type": "lstm"}, {"prompt": (3, D)}),  # [m, d]
    "prefix_tuning": (
        {"num_virtual_tokens": 2},
        {"keys": (L, HKV, 2, DH), "values": (L, HKV, 2, DH)},  # [L, Hkv, m, Dh] each
    ),
    "gist": (
        {"num_gist_tokens": 2, "next_position": 9},
        {"keys": (L, HKV, 2, DH), "values": (L, HKV, 2, DH)},  # [L, Hkv, k, Dh] each
    ),
    "gist_embedding": ({"num_gist_tokens": 2}, {"gist_embeddings": (2, D)}),  # [k, d]
    "accept": (
        {
            "num_virtual_tokens": 3,
            "num_subspaces": 2,
            "num_codewords": 4,
            "added_length": 2,
            "added_subspaces": 4,
            "added_codewords": 2,
        },
        {
            "prompt_weight": (3, 2, 4),  # [m, K, r]
            "prompt_codebook": (2, 4, D // 2),  # [K, r, d/K]
            "added_weight": (2, 4, 2),  # [s, Ka, ra]
            "added_codebook": (4, 2, D // 4),  # [Ka, ra, d/Ka]
        },
    ),
}
METHOD_NAMES = sorted(SPECS)

INVALID_IDS = ["../x", "/abs", "a\x00b", "a" * 65, "Upper", "%2e%2e%2f", "tâche", "", "a/b", "x\n", "a..b"]


def build(task_id: str, method: str = "prompt_tuning", seed: int = 0, base: Fingerprint = FP) -> Artifact:
    """A valid artifact of `method` with random (seeded) tensors."""
    config, shapes = SPECS[method]
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: torch.randn(*shape, generator=gen) for name, shape in shapes.items()}
    return make_artifact(task_id, method, config, tensors, base, notes=f"seed {seed}")


def build_filled(task_id: str, value: float, m: int = 64) -> Artifact:
    """A prompt_tuning artifact whose prompt [m, d] is all `value` (content identifies the writer)."""
    prompt = torch.full((m, D), value)  # [m, d]
    return make_artifact(task_id, "prompt_tuning", {"num_virtual_tokens": m}, {"prompt": prompt}, FP)


def with_task_id(artifact: Artifact, task_id: str) -> Artifact:
    """The same artifact claiming another (possibly invalid) task id; make_artifact would refuse it."""
    return Artifact(dataclasses.replace(artifact.manifest, task_id=task_id), artifact.tensors)


def assert_same_tensors(a: Artifact, b: Artifact) -> None:
    assert sorted(a.tensors) == sorted(b.tensors)
    for name in a.tensors:
        assert torch.equal(a.tensors[name], b.tensors[name]), name


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> float:
    """Seconds until predicate() was true; raises AssertionError after `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


READY_TASK = "watch-ready"


def _until_live(writer: Store, events: list[ChangeEvent], poll_interval: float) -> None:
    """Put READY_TASK until the watch reports it (a put before the baseline is not a change)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        writer.put(build(READY_TASK))
        try:
            attempt = min(poll_interval, 0.5) + 0.3  # pub/sub delivers at once; polls every poll_interval
            wait_for(lambda: any(e.task_id == READY_TASK for e in events), timeout=attempt)
        except AssertionError:
            continue
        events.clear()
        return
    raise AssertionError("watch() never reported the readiness put")


@contextmanager
def watching(store: Store, poll_interval: float, writer: Store | None = None) -> Iterator[list[ChangeEvent]]:
    """Run store.watch() in a thread; yields the (growing) list of events it produced.

    With `writer`, a put of READY_TASK is seen first, proving the watch is live (baseline taken,
    subscribed); that event is then removed from the list.
    """
    events: list[ChangeEvent] = []
    stop = threading.Event()

    def run() -> None:
        for event in store.watch(stop, poll_interval):
            events.append(event)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        if writer is None:
            time.sleep(0.2)
        else:
            _until_live(writer, events, poll_interval)
        yield events
    finally:
        stop.set()
        thread.join(5)
        assert not thread.is_alive(), "watch() did not end after stop was set"
