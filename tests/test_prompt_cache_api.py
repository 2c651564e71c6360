"""The prompt cache through the API: usage reports cached tokens (OpenAI's prompt_tokens_details), answers
are unchanged by hits, and /metrics shows hit and miss tokens."""

from __future__ import annotations

from pathlib import Path

from api_helpers import prompt_artifact_bytes, serving, upload

from runtime.prompt_cache import BLOCK

SYSTEM = "You are a careful assistant. Answer in one short sentence, in plain words. " * 2


def test_usage_reports_cached_tokens_and_answers_do_not_change(tmp_path: Path) -> None:
    with serving(tmp_path) as (client, state):
        assert (
            upload(client, "t", prompt_artifact_bytes("t", state.runner.fingerprint, m=4)).status_code == 201
        )
        body = {"model": "t", "prompt": SYSTEM + "Q: cats?", "max_tokens": 6}
        first = client.post("/v1/completions", json=body).json()
        assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        second = client.post("/v1/completions", json={**body, "prompt": SYSTEM + "Q: dogs?"}).json()
        cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached > 0 and cached % BLOCK == 0 and cached < second["usage"]["prompt_tokens"]
        again = client.post("/v1/completions", json=body).json()
        assert again["choices"][0]["text"] == first["choices"][0]["text"]  # a hit gives the same answer
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= cached

        chat = {
            "model": "t",
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}],
        }
        client.post("/v1/chat/completions", json=chat)
        hit = client.post("/v1/chat/completions", json=chat).json()
        assert hit["usage"]["prompt_tokens_details"]["cached_tokens"] > 0

        generated = client.post(
            "/generate", json={"task_id": "t", "prompt": SYSTEM + "Q: cats?", "max_new_tokens": 6}
        )
        assert generated.json()["usage"]["cached_tokens"] > 0
        assert generated.json()["text"] == first["choices"][0]["text"]

        other = client.post("/generate", json={"prompt": SYSTEM + "Q: cats?", "max_new_tokens": 2}).json()
        assert other["usage"]["cached_tokens"] == 0  # the bare model never reuses a task's blocks

        metrics = client.get("/metrics").text
        hits = next(
            line for line in metrics.splitlines() if line.startswith("softserve_prompt_cache_hit_tokens")
        )
        assert float(hits.split()[-1]) > 0
        assert 'softserve_cache_bytes{cache="prompt_blocks"}' in metrics
