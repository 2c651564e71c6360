"""A request's n choices (one engine row each) are submitted all or none and leave together: a full queue
refuses the whole request (429, nothing of it runs), and a client that hangs up (streaming or not) takes
all its rows out of the batch. Real uvicorn in a thread, the official client, raw sockets."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import openai
import pytest
from engine_hold import Hold, wait_for
from live_server import threaded_server

N = 4
NEW_TOKENS = 400  # each row would run for hundreds of steps if nobody cancelled it


def test_a_full_queue_refuses_every_choice(tmp_path: Path) -> None:
    with threaded_server(tmp_path, max_queue=2, max_batch_size=1) as (url, state):
        engine = state.engine
        hold = Hold(engine).wait()  # room: 2 waiting + 1 free batch slot = 3 rows, fewer than N
        r = httpx.post(f"{url}/generate", json={"prompt": "x", "n": N, "max_new_tokens": 3}, timeout=30)
        assert r.status_code == 429 and "queue is full" in r.json()["error"]["message"]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError) as exc:
            client.completions.create(model="base", prompt="x", n=N, max_tokens=3)
        assert exc.value.body["code"] == "queue_full"  # type: ignore[index]
        hold.release()
        wait_for(lambda: engine.load() == (0, 0), f"rows of a refused request ran: {engine.load()}")
        assert engine.tokens_generated == 0 and set(engine.finished) == {"cancelled"}
        ok = httpx.post(f"{url}/generate", json={"prompt": "x", "n": 3, "max_new_tokens": 2}, timeout=30)
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 3


def test_a_client_that_leaves_takes_all_its_choices(tmp_path: Path) -> None:
    with threaded_server(tmp_path, max_new_tokens=NEW_TOKENS) as (url, state):
        engine = state.engine
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps(
            {
                "model": "base",
                "messages": [{"role": "user", "content": "hi"}],
                "n": N,
                "max_tokens": NEW_TOKENS,
            }
        ).encode()
        head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_for(lambda: engine.load() == (N, 0), f"the {N} rows never ran: {engine.load()}")
        sock.close()  # non-streaming, the response never read
        wait_for(lambda: engine.load() == (0, 0), f"rows still running: {engine.load()}")
        assert engine.finished == {"cancelled": N}

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        stream = client.chat.completions.create(
            model="base",
            messages=[{"role": "user", "content": "hi"}],
            n=N,
            max_tokens=NEW_TOKENS,
            stream=True,
        )
        next(iter(stream))
        wait_for(lambda: engine.load() == (N, 0), f"the {N} streamed rows never ran: {engine.load()}")
        stream.close()  # the client hangs up mid-stream
        wait_for(lambda: engine.load() == (0, 0), f"streamed rows still running: {engine.load()}")
        wait_for(lambda: engine.finished.get("cancelled") == 2 * N, f"{engine.finished}")
        assert engine.tokens_generated < 2 * N * NEW_TOKENS
