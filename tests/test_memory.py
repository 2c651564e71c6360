"""Host memory freed by cache evictions is handed back to the OS (glibc malloc_trim), rate-limited."""

from __future__ import annotations

import sys

import pytest

from server.memory import MemoryTrimmer


def test_trims_only_after_new_evictions_and_at_most_once_per_interval() -> None:
    trimmer = MemoryTrimmer(min_interval_s=3600)
    calls: list[int] = []
    trimmer._trim = lambda pad: calls.append(pad) or 1  # record instead of trimming
    assert not trimmer.after_evictions(0)  # nothing evicted yet
    assert trimmer.after_evictions(3) and calls == [0]
    assert not trimmer.after_evictions(3)  # no new evictions
    assert not trimmer.after_evictions(9)  # new ones, but within the interval
    trimmer.min_interval_s = 0
    assert trimmer.after_evictions(9) and trimmer.trims == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_glibc_malloc_trim_is_found_and_runs() -> None:
    trimmer = MemoryTrimmer(min_interval_s=0)
    assert trimmer.available
    assert trimmer.after_evictions(1) and trimmer.trims == 1


def test_an_engine_that_evicts_prefixes_trims(monkeypatch: pytest.MonkeyPatch) -> None:
    from api_helpers import tiny_runner
    from engine_refs import random_prompt, request, task

    from server.engine import Engine

    runner = tiny_runner()
    prefix_bytes = 2 * runner.num_layers * runner.num_kv_heads * 4 * runner.head_dim * 4  # one m=4 prefix
    engine = Engine(runner, prefix_cache_bytes=prefix_bytes)  # room for one task's prefix
    engine.memory.min_interval_s = 0
    for i in range(3):
        t = task(f"t{i}", "prompt_tuning", random_prompt(runner.hidden_size, 4, seed=i))
        engine.generate_sync(request([1, 2, 3], 2, t))
    assert engine.prefix_cache.evictions == 2
    assert engine.memory.trims == 2
