"""One request's numbers never fail another: 8 normal requests + 1 with degenerate sampling values, over HTTP.

The hostile request carries a temperature and a top_p the schema accepts but float32 cannot divide by or
compare with (1e-300: today NaN probabilities, and every request prefilled in the same step got a 500). It
arrives in the same prefill step as the 8 others, or while they decode; on /generate, /v1/completions and
/v1/chat/completions every normal request gets 200 and exactly what it gets alone. Real uvicorn; the engine
is held at the start of a step (by a prefix warm-up job that waits, as a slow step would) so that the
requests provably meet in one prefill, or the hostile one provably joins a batch that is decoding.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from engine_hold import Hold, wait_for
from live_server import threaded_server

NEW = 24
PROMPTS = ["hello there", "zebra", "a b c", "once upon", "x", "12345", "why?", "good day sir"]
HOSTILE: dict[str, Any] = {"temperature": 1e-300, "top_p": 1e-300, "seed": 3}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    with threaded_server(tmp_path_factory.mktemp("isolation")) as (url, state):
        yield url, state


def body(route: str, prompt: str, sampling: dict[str, Any]) -> dict[str, Any]:
    if route == "/generate":
        return {"prompt": prompt, "max_new_tokens": NEW, **sampling}
    if route == "/v1/completions":
        return {"model": "base", "prompt": prompt, "max_tokens": NEW, **sampling}
    return {"model": "base", "messages": [{"role": "user", "content": prompt}], "max_tokens": NEW, **sampling}


def normal_sampling(i: int) -> dict[str, Any]:
    return {"temperature": 0.8, "top_p": 0.9, "seed": 20 + i} if i % 2 else {}


def post(url: str, route: str, payload: dict[str, Any]) -> tuple[int, Any]:
    r = httpx.post(f"{url}{route}", json=payload, timeout=60)
    return r.status_code, r.json()


def outcome(route: str, status: int, data: Any) -> tuple[Any, ...]:
    """What must match the solo run: the tokens (native) or the text and token count (OpenAI)."""
    assert status == 200, data
    if route == "/generate":
        return data["tokens"], data["finish_reason"]
    choice = data["choices"][0]
    text = choice["text"] if route == "/v1/completions" else choice["message"]["content"]
    return text, data["usage"]["completion_tokens"], choice["finish_reason"]


@pytest.mark.parametrize("route", ["/generate", "/v1/completions", "/v1/chat/completions"])
def test_hostile_sampling_values_fail_nobody(server: tuple[str, Any], route: str) -> None:
    url, state = server
    engine = state.engine
    alone = [
        outcome(route, *post(url, route, body(route, p, normal_sampling(i)))) for i, p in enumerate(PROMPTS)
    ]
    assert all(o[-1] == "length" for o in alone)  # all eight run their NEW tokens
    greedy_alone = outcome(route, *post(url, route, body(route, PROMPTS[0], {})))
    normals = [body(route, p, normal_sampling(i)) for i, p in enumerate(PROMPTS)]
    hostile = body(route, PROMPTS[0], HOSTILE)
    with ThreadPoolExecutor(max_workers=len(PROMPTS) + 1) as pool:
        # 1. all nine in one prefill step
        hold = Hold(engine).wait()
        futures = [pool.submit(post, url, route, b) for b in [*normals, hostile]]
        wait_for(lambda: engine.queue_depth == len(PROMPTS) + 1, "the 9 requests never queued")
        hold.release()
        results = [f.result() for f in futures]
        assert [outcome(route, *r) for r in results[:-1]] == alone
        assert outcome(route, *results[-1]) == greedy_alone  # below 1e-5 the temperature is greedy

        # 2. the hostile one joins while the eight decode
        hold = Hold(engine).wait()
        futures = [pool.submit(post, url, route, b) for b in normals]
        wait_for(lambda: engine.queue_depth == len(PROMPTS), "the 8 requests never queued")
        again = Hold(engine)  # taken at the step after the one that admits the eight
        hold.release()
        again.wait()
        assert engine.load() == (len(PROMPTS), 0)  # all eight decoding, none finished
        late = pool.submit(post, url, route, hostile)
        wait_for(lambda: engine.queue_depth == 1, "the hostile request never queued")
        again.release()
        assert [outcome(route, *f.result()) for f in futures] == alone
        assert outcome(route, *late.result()) == greedy_alone
    assert engine.finished.get("error", 0) == 0
