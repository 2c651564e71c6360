"""The event loop never waits on a big request: text that cannot fit is refused before any tokenizing or
chat templating, and what is tokenized is tokenized off the loop.

A `softserve serve` subprocess (real uvicorn) gets a 10 MB chat body (256 messages of 40,000 characters: every
field is within the schema's bounds, the total is not). While it is received and refused, /healthz is probed
every 50 ms and must answer each probe within 100 ms, and the server's RSS must grow by less than 200 MB.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_server import ServerProcess, save_tiny_model

PROBE_EVERY_S = 0.05
PROBE_WITHIN_S = 0.1
RSS_GROWTH_BOUND = 200 * 1024 * 1024
MESSAGES, CHARS = 256, 40_000  # 10.24 MB of text; the schema allows 256 messages of 1,000,000 characters
MAX_PROMPT_TOKENS = 2048
LIMIT = MAX_PROMPT_TOKENS * 16  # the tiny byte tokenizer's longest token is short: the 16 chars/token floor


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("big-bodies")
    model = save_tiny_model(folder / "model")
    proc = ServerProcess(model, f"disk:{folder / 'store'}", folder / "server.log")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def big_messages() -> list[dict[str, str]]:
    return [
        {
            "role": "user" if i % 2 == 0 else "assistant",
            "content": f"{i:03d} " + "lorem ipsum " * (CHARS // 12),
        }
        for i in range(MESSAGES)
    ]


BODIES: dict[str, tuple[str, dict[str, Any], str]] = {
    "chat-10MB": ("/v1/chat/completions", {"model": "base", "messages": big_messages()}, "messages"),
    "generate-messages-10MB": ("/generate", {"messages": big_messages()}, "messages"),
    "completions-prompt-1M": ("/v1/completions", {"model": "base", "prompt": "x" * 1_000_000}, "prompt"),
}


@pytest.mark.parametrize("name", list(BODIES))
def test_big_body_is_refused_while_the_loop_keeps_answering(server: ServerProcess, name: str) -> None:
    route, payload, field = BODIES[name]
    data = json.dumps(payload).encode()
    with httpx.Client(base_url=server.url, timeout=10) as probe:
        assert probe.get("/healthz").status_code == 200
        small = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert probe.post("/v1/chat/completions", json=small).status_code == 200  # warm
        baseline = rss_bytes(server.proc.pid)
        result: dict[str, Any] = {}

        def send() -> None:
            headers = {"content-type": "application/json"}
            r = httpx.post(f"{server.url}{route}", content=data, headers=headers, timeout=60)
            result["status"], result["body"] = r.status_code, r.json()

        sender = threading.Thread(target=send)
        latencies: list[float] = []
        peak = baseline
        sender.start()
        after = 0
        while after < 4:  # probe throughout, and a few times after the answer
            t0 = time.monotonic()
            assert probe.get("/healthz").status_code == 200
            latencies.append(time.monotonic() - t0)
            peak = max(peak, rss_bytes(server.proc.pid))
            after += not sender.is_alive()
            time.sleep(max(0.0, PROBE_EVERY_S - (time.monotonic() - t0)))
        sender.join(60)
    assert result["status"] == 422, result
    error = result["body"]["error"]
    assert (
        error.get("field", error.get("param")) == field  # /v1/*: OpenAI's error shape names it `param`
        and str(LIMIT) in error["message"]
        and str(MAX_PROMPT_TOKENS) in error["message"]
    )
    assert len(latencies) >= 5
    assert max(latencies) < PROBE_WITHIN_S, [round(x, 3) for x in latencies]
    assert peak - baseline < RSS_GROWTH_BOUND, (baseline, peak)


def test_text_within_the_bound_is_tokenized(server: ServerProcess) -> None:
    """Under the character bound, text is tokenized (off the loop): served when it fits the tiny model's
    512-token context, refused by the token limit itself when it does not."""
    r = httpx.post(f"{server.url}/generate", json={"prompt": "y" * 400, "max_new_tokens": 2}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 400
    r = httpx.post(f"{server.url}/generate", json={"prompt": "é" * 1100, "max_new_tokens": 2}, timeout=30)
    assert r.status_code == 422 and "2200 tokens" in r.json()["error"]["message"]  # 2 bytes per character
