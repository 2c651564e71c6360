"""Queue limit (429 + Retry-After) and deadlines (504) through the real app on a tiny model."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from api_helpers import serving

LONG = {"prompt": "a long one", "max_new_tokens": 400}


def wait_until(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def test_queue_full_is_429_with_retry_after_and_nothing_is_lost(tmp_path: Path) -> None:
    with serving(tmp_path, max_batch_size=1, max_queue=1, max_new_tokens=400) as (client, state):
        results: dict[str, int] = {}

        def queued() -> None:
            results["queued"] = client.post(
                "/generate", json={"prompt": "b", "max_new_tokens": 2}
            ).status_code

        with client.stream("POST", "/generate", json={**LONG, "stream": True}) as running:
            lines = running.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # the long request holds the only slot
            waiter = threading.Thread(target=queued)
            waiter.start()
            wait_until(lambda: state.engine.stats()["queue_depth"] == 1)
            rejected = client.post("/generate", json={"prompt": "c", "max_new_tokens": 2})
            assert rejected.status_code == 429
            assert int(rejected.headers["retry-after"]) >= 1
            assert "queue" in rejected.json()["error"]["message"]
            # streaming too: the 429 comes before any header, not as a 200 whose stream breaks off
            for path, body in (
                ("/generate", {"prompt": "d", "max_new_tokens": 2, "stream": True}),
                ("/v1/completions", {"prompt": "d", "max_tokens": 2, "stream": True}),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "d"}], "stream": True}),
            ):
                streamed = client.post(path, json=body)
                assert streamed.status_code == 429, (path, streamed.status_code, streamed.text)
                assert streamed.headers["retry-after"] and "queue" in streamed.json()["error"]["message"]
            final = [json.loads(line[6:]) for line in lines if line.startswith("data: {")][-1]
        assert final["finish_reason"] == "length"  # precondition: the long request really ran to its limit
        waiter.join(30)
        assert results["queued"] == 200
        assert 'softserve_rejections_total{reason="queue_full"} 4.0' in client.get("/metrics").text
        wait_until(lambda: state.engine.stats()["batch_size"] == 0)


def test_deadline_exceeded_is_504_and_frees_the_slot(tmp_path: Path) -> None:
    with serving(tmp_path, request_timeout_s=0.05, max_new_tokens=400) as (client, state):
        r = client.post("/generate", json=LONG)
        assert r.status_code == 504 and "deadline" in r.json()["error"]["message"]
        wait_until(lambda: state.engine.stats()["batch_size"] == 0)
        assert state.engine.stats()["queue_depth"] == 0
