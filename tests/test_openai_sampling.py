"""Sampling features on a live server (real uvicorn, tiny model), one implementation behind /generate and
both OpenAI routes (the official client): presence/frequency/repetition penalties and logit_bias equal a
hand-computed reference (argmax of the penalised logits), log-probs equal log_softmax of those logits
(before temperature), and `n` runs one batch row per choice with distinct derived seeds. Streaming and not.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from api_helpers import VOCAB
from conftest import tiny_llama
from engine_hold import Hold, wait_for
from live_server import threaded_server
from sampling_refs import Reference, forced, greedy

from server.tokenization import encode_chat, encode_text, token_piece

NEW = 12
PROMPT = "hello hello hello"
CHAT = [{"role": "user", "content": "abc abc"}]
TOKEN_PROMPT = [75, 76, 75, 76, 75]
# API parameters -> the reference's own arguments
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "presence": ({"presence_penalty": 1.5}, {"presence": 1.5}),
    "frequency": ({"frequency_penalty": 0.7}, {"frequency": 0.7}),
    "negative": ({"presence_penalty": -2.0, "frequency_penalty": 0.3}, {"presence": -2.0, "frequency": 0.3}),
    "bias": ({"logit_bias": {"70": 4.0, "71": -100}}, {"bias": {70: 4.0, 71: -100.0}}),
    "all": (
        {"presence_penalty": 0.5, "frequency_penalty": 0.5, "logit_bias": {"80": 3.0}},
        {"presence": 0.5, "frequency": 0.5, "bias": {80: 3.0}},
    ),
}
NATIVE_ONLY = {"repetition": ({"repetition_penalty": 2.5}, {"repetition": 2.5})}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    with threaded_server(tmp_path_factory.mktemp("sampling")) as (url, state):
        yield url, state


@pytest.fixture(scope="module")
def model() -> Any:
    return tiny_llama(seed=0, vocab_size=VOCAB)  # the served weights, a copy of our own


@pytest.fixture(scope="module")
def client(server: tuple[str, Any]) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="x", max_retries=0)


def generate(url: str, **body: Any) -> dict[str, Any]:
    """POST /generate, whole or streamed (then rebuilt into the whole response's fields)."""
    r = httpx.post(f"{url}/generate", json={"prompt": PROMPT, "max_new_tokens": NEW, **body}, timeout=60)
    assert r.status_code == 200, r.text
    if not body.get("stream"):
        return dict(r.json())
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    tokens = [c for c in chunks if c["token"] is not None]
    return {
        "tokens": [c["token"] for c in tokens],
        "text": "".join(c["text"] for c in chunks),
        "logprobs": [{"logprob": c["logprob"], "top_logprobs": c["top_logprobs"]} for c in tokens]
        if body.get("logprobs") is not None
        else None,
    }


def assert_logprobs(served: list[float], ref: Reference) -> None:
    assert served == pytest.approx(ref.logprobs, abs=1e-4)


def test_the_cases_change_greedy_output(server: tuple[str, Any], model: Any) -> None:
    """Each case's reference differs from plain greedy, so a server ignoring the parameter fails."""
    state = server[1]
    ids = encode_text(state.runner.tokenizer, PROMPT)
    plain = greedy(model, ids, NEW, state.runner.eos_ids).tokens
    for name, (_, ref_kw) in {**CASES, **NATIVE_ONLY}.items():
        assert greedy(model, ids, NEW, state.runner.eos_ids, **ref_kw).tokens != plain, name


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("case", list({**CASES, **NATIVE_ONLY}))
def test_generate_penalties_equal_the_reference(
    server: tuple[str, Any], model: Any, case: str, stream: bool
) -> None:
    url, state = server
    api_kw, ref_kw = {**CASES, **NATIVE_ONLY}[case]
    ids = encode_text(state.runner.tokenizer, PROMPT)
    ref = greedy(model, ids, NEW, state.runner.eos_ids, k=3, **ref_kw)
    out = generate(url, logprobs=3, stream=stream, **api_kw)
    assert out["tokens"] == ref.tokens
    assert_logprobs([t["logprob"] for t in out["logprobs"]], ref)
    assert [[a["token"] for a in t["top_logprobs"]] for t in out["logprobs"]] == [
        [i for i, _ in top] for top in ref.top
    ]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("case", list(CASES))
def test_completions_penalties_equal_the_reference(
    server: tuple[str, Any], model: Any, client: openai.OpenAI, case: str, stream: bool
) -> None:
    state = server[1]
    api_kw, ref_kw = CASES[case]
    ref = greedy(model, TOKEN_PROMPT, NEW, state.runner.eos_ids, k=2, **ref_kw)
    kw = {"model": "base", "prompt": TOKEN_PROMPT, "max_tokens": NEW, "logprobs": 2, **api_kw}
    if stream:
        text, logprobs = "", []
        for chunk in client.completions.create(stream=True, **kw):
            text += chunk.choices[0].text
            logprobs += chunk.choices[0].logprobs.token_logprobs if chunk.choices[0].logprobs else []
    else:
        out = client.completions.create(**kw)
        text, logprobs = out.choices[0].text, out.choices[0].logprobs.token_logprobs
        assert out.usage.completion_tokens == len(ref.tokens)
        pieces = [token_piece(state.runner.tokenizer, t)[0] for t in ref.tokens]
        assert out.choices[0].logprobs.tokens == pieces
        for top, ref_top in zip(out.choices[0].logprobs.top_logprobs, ref.top, strict=True):
            # keyed by text: byte tokens of a multi-byte character all read U+FFFD, so entries may merge
            assert 1 <= len(top) <= 3 and max(top.values()) == pytest.approx(ref_top[0][1], abs=1e-4)
    assert text == state.runner.decode(ref.tokens)
    assert_logprobs(logprobs, ref)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("case", ["presence", "bias"])
def test_chat_penalties_and_logprobs_equal_the_reference(
    server: tuple[str, Any], model: Any, client: openai.OpenAI, case: str, stream: bool
) -> None:
    state = server[1]
    api_kw, ref_kw = CASES[case]
    ids = encode_chat(state.runner.tokenizer, CHAT)
    ref = greedy(model, ids, NEW, state.runner.eos_ids, k=3, **ref_kw)
    kw = {"model": "base", "messages": CHAT, "max_tokens": NEW, "logprobs": True, "top_logprobs": 3, **api_kw}
    if stream:
        content = [
            lp
            for c in client.chat.completions.create(stream=True, **kw)
            if c.choices and c.choices[0].logprobs
            for lp in c.choices[0].logprobs.content or []
        ]
    else:
        content = client.chat.completions.create(**kw).choices[0].logprobs.content
    tokenizer = state.runner.tokenizer
    assert [bytes(lp.bytes) for lp in content] == [token_piece(tokenizer, t)[1] for t in ref.tokens]
    assert_logprobs([lp.logprob for lp in content], ref)
    for lp, ref_top in zip(content, ref.top, strict=True):
        assert [bytes(t.bytes) for t in lp.top_logprobs] == [token_piece(tokenizer, i)[1] for i, _ in ref_top]
        assert [t.logprob for t in lp.top_logprobs] == pytest.approx([v for _, v in ref_top], abs=1e-4)


def test_logprobs_are_before_temperature(server: tuple[str, Any], model: Any, client: openai.OpenAI) -> None:
    """Sampled at temperature 1.7, a token's reported log-prob is the model's (as the request's penalties
    changed it), not the flattened distribution it was drawn from."""
    url, state = server
    out = generate(url, temperature=1.7, seed=5, logprobs=0, presence_penalty=0.4)
    ids = encode_text(state.runner.tokenizer, PROMPT)
    assert_logprobs([t["logprob"] for t in out["logprobs"]], forced(model, ids, out["tokens"], presence=0.4))
    chat = client.chat.completions.create(
        model="base", messages=CHAT, max_tokens=NEW, temperature=1.7, seed=5, logprobs=True
    )
    content = chat.choices[0].logprobs.content
    tokenizer = state.runner.tokenizer
    by_bytes = {token_piece(tokenizer, i)[1]: i for i in range(VOCAB)}  # every token's bytes are distinct
    tokens = [by_bytes[bytes(lp.bytes)] for lp in content]
    ref = forced(model, encode_chat(tokenizer, CHAT), tokens)
    assert_logprobs([lp.logprob for lp in content], ref)


def test_n_choices_have_distinct_derived_seeds(server: tuple[str, Any], client: openai.OpenAI) -> None:
    url, _ = server
    many = generate(url, n=4, temperature=1.0, seed=11)
    tokens = [c["tokens"] for c in many["choices"]]
    assert len({tuple(t) for t in tokens}) == 4 and many["tokens"] == tokens[0]
    assert generate(url, temperature=1.0, seed=11)["tokens"] == tokens[0]  # choice 0 keeps the seed
    assert [c["tokens"] for c in generate(url, n=4, temperature=1.0, seed=11)["choices"]] == tokens
    assert many["usage"]["completion_tokens"] == sum(map(len, tokens))
    streamed = httpx.post(
        f"{url}/generate",
        json={
            "prompt": PROMPT,
            "max_new_tokens": NEW,
            "n": 4,
            "temperature": 1.0,
            "seed": 11,
            "stream": True,
        },
    )
    chunks = [json.loads(x[6:]) for x in streamed.text.splitlines() if x.startswith("data: {")]
    assert [
        [c["token"] for c in chunks if c["index"] == i and c["token"] is not None] for i in range(4)
    ] == tokens
    kw = {"model": "base", "messages": CHAT, "max_tokens": NEW, "temperature": 1.0, "seed": 11, "n": 4}
    chat = [c.message.content for c in client.chat.completions.create(**kw).choices]
    assert len(set(chat)) == 4 and chat == [
        c.message.content for c in client.chat.completions.create(**kw).choices
    ]


def test_n_is_one_batch_row_per_choice(server: tuple[str, Any], client: openai.OpenAI) -> None:
    url, state = server
    engine = state.engine
    with ThreadPoolExecutor(2) as pool:
        hold = Hold(engine).wait()
        native = pool.submit(generate, url, n=3, temperature=0.5, seed=1)
        wait_for(lambda: engine.queue_depth == 3, "n=3 did not queue 3 rows")
        chat = pool.submit(
            client.chat.completions.create, model="base", messages=CHAT, max_tokens=4, n=5, temperature=0.5
        )
        wait_for(lambda: engine.queue_depth == 8, "n=5 did not queue 5 rows")
        hold.release()
        assert len(native.result()["choices"]) == 3 and len(chat.result().choices) == 5


def test_plain_rows_are_exact_beside_penalised_rows(server: tuple[str, Any], model: Any) -> None:
    """Rows with penalties, logit_bias and logprobs in the same batch leave a plain greedy row untouched."""
    url, state = server
    plain_alone = generate(url)["tokens"]
    bodies = [
        {},
        {"presence_penalty": 1.5, "logprobs": 2},
        {"logit_bias": {"70": 4.0}},
        {"repetition_penalty": 2.5},
    ]
    with ThreadPoolExecutor(len(bodies)) as pool:
        hold = Hold(state.engine).wait()
        futures = [pool.submit(generate, url, **b) for b in bodies]
        wait_for(lambda: state.engine.queue_depth == len(bodies), "the requests never queued")
        hold.release()
        results = [f.result()["tokens"] for f in futures]
    ids = encode_text(state.runner.tokenizer, PROMPT)
    eos = state.runner.eos_ids
    assert results[0] == plain_alone
    assert results[1] == greedy(model, ids, NEW, eos, presence=1.5).tokens
    assert results[2] == greedy(model, ids, NEW, eos, bias={70: 4.0}).tokens
    assert results[3] == greedy(model, ids, NEW, eos, repetition=2.5).tokens


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"logit_bias": {"259": 1}}, "logit_bias"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"n": 17}, "n"),
        ({"logprobs": 21}, "logprobs"),
    ],
)
def test_generate_refuses_bad_sampling_values(
    server: tuple[str, Any], body: dict[str, Any], field: str
) -> None:
    r = httpx.post(f"{server[0]}/generate", json={"prompt": "x", **body}, timeout=30)
    assert r.status_code == 422 and field in r.text, r.text
