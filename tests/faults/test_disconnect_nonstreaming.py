"""Non-streaming clients that leave free their slots: 40 of them hang up after 1 s, the server notices every
hang-up within 1 s, and within 2 engine steps of that neither the batch nor the queue holds any of them; the
next request is served at once.

Real uvicorn (in a thread, so the engine is observable) and real TCP connections from raw sockets, closed by
the client with the response unread (32 requests run in the batch, 8 wait in the queue).
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
from live_server import threaded_server

CLIENTS = 40
NEW_TOKENS = 440  # each request would run for hundreds of steps if nobody cancelled it
ROUTES = ["/generate", "/v1/completions", "/v1/chat/completions"]


def request_bytes(route: str, i: int, port: int) -> bytes:
    prompt = f"story number {i}:"
    if route == "/generate":
        body: dict[str, object] = {"prompt": prompt, "max_new_tokens": NEW_TOKENS}
    elif route == "/v1/completions":
        body = {"model": "base", "prompt": prompt, "max_tokens": NEW_TOKENS}
    else:
        body = {"model": "base", "messages": [{"role": "user", "content": prompt}], "max_tokens": NEW_TOKENS}
    data = json.dumps(body).encode()
    head = (
        f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


def wait_for(predicate: object, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.001)


def test_forty_clients_that_hang_up_leave_within_two_steps(tmp_path: Path) -> None:
    with threaded_server(tmp_path, max_new_tokens=NEW_TOKENS, max_batch_size=32) as (url, state):
        engine = state.engine
        port = int(url.rsplit(":", 1)[1])
        socks = []
        started = time.monotonic()
        for i in range(CLIENTS):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(request_bytes(ROUTES[i % len(ROUTES)], i, port))
            socks.append(sock)
        wait_for(
            lambda: engine.load() == (32, CLIENTS - 32),
            f"the 40 requests never all arrived: {engine.load()} {engine.finished}",
            20,
        )
        time.sleep(max(0.0, started + 1.0 - time.monotonic()))
        assert engine.load() == (32, CLIENTS - 32), "a request ended before its client left"
        reqs = [row.req for row in engine._rows] + engine._inbox.requests()
        assert len(reqs) == CLIENTS
        closed = time.monotonic()
        for sock in socks:
            sock.close()  # the response is never read
        # the server notices every hang-up (the event loop's disconnect watch cancels the request) ...
        wait_for(lambda: all(req.cancelled.is_set() for req in reqs), "a hang-up was never noticed", 5)
        noticed_at, noticed_in = engine.steps, time.monotonic() - closed
        assert noticed_in < 1.0, noticed_in
        # ... and the engine frees their slots and queue places within two steps of that
        wait_for(lambda: engine.load() == (0, 0), f"still running/waiting: {engine.load()}", 10)
        assert engine.steps - noticed_at <= 2, (noticed_at, engine.steps)
        wait_for(lambda: engine.finished.get("cancelled") == CLIENTS, f"{engine.finished}", 5)  # counted last
        assert engine.finished == {"cancelled": CLIENTS}
        assert engine.tokens_generated < 32 * NEW_TOKENS
        t0 = time.monotonic()
        r = httpx.post(f"{url}/generate", json={"prompt": "next", "max_new_tokens": 4}, timeout=30)
        assert r.status_code == 200 and r.json()["finish_reason"] == "length"
        assert time.monotonic() - t0 < 2.0  # served at once: nobody holds a slot any more
