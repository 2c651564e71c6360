"""A client that closes its connection mid-stream: its request leaves the batch at the next engine step.

Real uvicorn (in a thread, so the engine is observable) and a real TCP connection closed by httpx.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
from live_server import threaded_server

NEW_TOKENS = 480  # the request would run for hundreds of steps if nobody cancelled it


def batch_size_metric(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith("softserve_batch_size "):
            return float(line.split()[1])
    raise AssertionError("softserve_batch_size missing from /metrics")


def test_disconnect_mid_stream_leaves_the_batch_within_one_step(tmp_path: Path) -> None:
    with threaded_server(tmp_path, max_new_tokens=NEW_TOKENS) as (url, state):
        engine = state.engine
        seen: dict[str, int] = {}

        def watch_cancel() -> None:
            """Record engine.steps when the request is flagged cancelled and when it has left."""
            deadline = time.monotonic() + 20
            while not engine._rows and time.monotonic() < deadline:
                time.sleep(0.001)
            req = engine._rows[0].req
            if req.cancelled.wait(timeout=20):
                seen["flagged"] = engine.steps
                while engine.active and time.monotonic() < deadline:
                    time.sleep(0.0005)
                seen["left"] = engine.steps

        watcher = threading.Thread(target=watch_cancel)
        watcher.start()
        body = {"prompt": "tell me everything", "max_new_tokens": NEW_TOKENS, "stream": True}
        with (
            httpx.Client(timeout=10) as client,
            client.stream("POST", f"{url}/generate", json=body) as response,
        ):
            assert response.status_code == 200
            chunks = 0
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    chunks += 1
                    if chunks == 3:
                        break  # leaving both blocks closes the socket with the body unread
        watcher.join(30)
        assert "left" in seen, f"request never flagged cancelled / never left: {seen}"
        assert seen["left"] - seen["flagged"] <= 2, seen  # the step in progress, then the next retires it
        assert engine.active == 0 and engine.queue_depth == 0
        assert engine.finished.get("cancelled") == 1 and "length" not in engine.finished
        assert engine.tokens_generated < NEW_TOKENS
        assert batch_size_metric(url) == 0
        # the server is unharmed: the next request runs normally
        r = httpx.post(f"{url}/generate", json={"prompt": "again", "max_new_tokens": 3}, timeout=30)
        assert r.status_code == 200 and len(r.json()["tokens"]) >= 1
