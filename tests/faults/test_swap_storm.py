"""1,000 requests during 50 hot swaps of one task (real uvicorn, tiny model, 64 concurrent clients).

Every request succeeds, reports a version that was current at some moment between its send and its
answer, and its tokens equal what that version produces alone (so it ran on one version from start to
end); the engine never holds more than max_batch_size running + max_queue waiting.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from api_helpers import prompt_artifact_bytes
from live_server import threaded_server

from server.requests import GenerationRequest, SamplingParams

REQUESTS = 1000
SWAPS = 50
CLIENTS = 64
MAX_BATCH = 8
MAX_QUEUE = 64
NEW_TOKENS = 3
BURST = 300
PROMPTS = ["alpha", "bravo charlie delta"]


@pytest.fixture()
def one_torch_thread() -> Iterator[None]:
    """Tiny-model ops gain nothing from a second intra-op thread, and lose a lot on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_torch_thread")
def test_thousand_requests_during_fifty_swaps(tmp_path: Path) -> None:
    # keep_versions: every version stays stored, as each one's tokens are checked alone afterwards
    settings = {"max_batch_size": MAX_BATCH, "max_queue": MAX_QUEUE, "keep_versions": SWAPS + 1}
    with threaded_server(tmp_path, **settings) as (url, state):
        fp = state.runner.fingerprint
        engine = state.engine
        peak = {"active": 0, "total": 0}
        stop = threading.Event()

        def monitor() -> None:
            while not stop.is_set():
                active, waiting = engine.load()  # read together, under the engine's queue lock
                peak["active"] = max(peak["active"], active)
                peak["total"] = max(peak["total"], active + waiting)
                time.sleep(0.002)

        watcher = threading.Thread(target=monitor, daemon=True)
        watcher.start()
        versions = {"started": 1, "done": 1}  # highest PUT begun / highest PUT answered
        results: list[tuple[int, int, int, dict]] = []  # (prompt index, lo, hi, body)
        failures: list[str] = []

        async def run() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:

                async def put(version: int) -> None:
                    files = {"file": ("s.safetensors", prompt_artifact_bytes("swap", fp, seed=version))}
                    r = await client.put("/tasks/swap", files=files)
                    assert r.status_code == 201 and r.json()["version"] == version, r.text

                await put(1)
                gate = asyncio.Semaphore(CLIENTS)

                wave = REQUESTS // SWAPS  # requests released after each swap
                published = [asyncio.Event() for _ in range(SWAPS + 2)]  # [v]: version v is current
                published[1].set()

                async def until(predicate) -> None:  # type: ignore[no-untyped-def]
                    deadline = time.monotonic() + 60
                    while not predicate():
                        assert time.monotonic() < deadline, "stalled"
                        await asyncio.sleep(0.002)

                async def one(i: int) -> None:
                    await published[1 + i // wave].wait()
                    async with gate:
                        lo = versions["done"]
                        prompt = PROMPTS[i % len(PROMPTS)]
                        body = {"task_id": "swap", "prompt": prompt, "max_new_tokens": NEW_TOKENS}
                        r = await client.post("/generate", json=body)
                        hi = versions["started"]
                        if r.status_code != 200:
                            failures.append(f"{r.status_code} {r.text[:200]}")
                            return
                        results.append((i % len(PROMPTS), lo, hi, r.json()))

                async def swapper() -> None:
                    for version in range(2, SWAPS + 2):
                        # half of the previous wave is answered, half still running or queued
                        answered = (version - 2) * wave + wave // 2
                        await until(lambda n=answered: len(results) + len(failures) >= n)
                        versions["started"] = version
                        await put(version)
                        versions["done"] = version
                        published[version].set()

                await asyncio.gather(swapper(), *(one(i) for i in range(REQUESTS)))

        t0 = time.monotonic()
        asyncio.run(run())
        elapsed = time.monotonic() - t0
        stop.set()
        watcher.join(5)

        assert failures == [], failures[:5]
        assert len(results) == REQUESTS
        seen_versions = {body["task_version"] for _, _, _, body in results}
        assert len(seen_versions) >= SWAPS * 0.8, f"swaps did not interleave with requests: {seen_versions}"
        assert sum(lo < hi for _, lo, hi, _ in results) >= SWAPS, "few requests overlapped a swap"
        for _, lo, hi, body in results:
            assert lo <= body["task_version"] <= hi, (lo, body["task_version"], hi)

        # what each version produces alone (one request at a time, straight on the engine)
        alone: dict[tuple[int, int], list[int]] = {}

        def tokens_alone(version: int, p: int) -> list[int]:
            if (version, p) not in alone:
                with state.cache.acquire("swap", version) as lease:
                    task = lease.task
                    ids = [int(t) for t in state.runner.tokenizer(PROMPTS[p])["input_ids"]]
                    req = GenerationRequest(ids, SamplingParams(max_new_tokens=NEW_TOKENS), task=task)
                    events = engine.generate_sync(req, timeout=30)
                alone[(version, p)] = [e.token_id for e in events if e.token_id is not None]
            return alone[(version, p)]

        for p, _, _, body in results:
            expected = tokens_alone(body["task_version"], p)
            assert body["tokens"] == expected, (body["task_version"], p, body["tokens"], expected)
        assert len({tuple(v) for v in alone.values()}) > 1  # versions really differ in output

        assert peak["active"] <= MAX_BATCH
        assert peak["total"] <= MAX_BATCH + MAX_QUEUE, peak
        assert engine.active == 0 and engine.queue_depth == 0

        # a burst far past the bound: the engine holds at most max_batch_size + max_queue, the rest is 429
        burst_peak = {"active": 0, "total": 0}
        peak.update(active=0, total=0)
        stop.clear()
        watcher = threading.Thread(target=monitor, daemon=True)
        watcher.start()

        async def burst() -> list[int]:
            limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=BURST)
            async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
                body = {"task_id": "swap", "prompt": PROMPTS[0], "max_new_tokens": NEW_TOKENS}
                expected = tokens_alone(SWAPS + 1, 0)
                answers = await asyncio.gather(*(client.post("/generate", json=body) for _ in range(BURST)))
            for r in answers:
                assert r.status_code in (200, 429), r.text
                if r.status_code == 200:
                    assert r.json()["tokens"] == expected
                else:
                    assert int(r.headers["retry-after"]) >= 1
            return [r.status_code for r in answers]

        codes = asyncio.run(burst())
        stop.set()
        watcher.join(5)
        burst_peak.update(peak)
        assert burst_peak["active"] <= MAX_BATCH
        assert burst_peak["total"] <= MAX_BATCH + MAX_QUEUE, burst_peak
        assert codes.count(200) >= MAX_BATCH + MAX_QUEUE // 2  # the bound was really reached...
        assert codes.count(429) > 0  # ...and passed
        print(f"{REQUESTS} requests, {SWAPS} swaps in {elapsed:.1f} s; burst: {codes.count(429)} x 429")
