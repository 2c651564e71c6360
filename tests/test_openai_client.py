"""The official `openai` client against a live server (real uvicorn, tiny model): models, errors in OpenAI's
shape naming the client's field and limit, refused parameters named, no-ops that change nothing, and the
request/response features of issue 12 item 4 (streaming and not). Sampling features: test_openai_sampling.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from api_helpers import prompt_artifact_bytes
from live_server import threaded_server

MAX_NEW = 40  # the server's SOFTSERVE_MAX_NEW_TOKENS here
CHAT = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    with threaded_server(tmp_path_factory.mktemp("openai"), max_new_tokens=MAX_NEW) as (url, state):
        data = prompt_artifact_bytes("t1", state.runner.fingerprint, m=3)
        files = {"file": ("t1.safetensors", data, "application/octet-stream")}
        assert httpx.put(f"{url}/tasks/t1", files=files, timeout=30).status_code == 201
        yield url, state


@pytest.fixture(scope="module")
def client(server: tuple[str, Any]) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="x", max_retries=0)


def chat(client: openai.OpenAI, **kw: Any) -> Any:
    return client.chat.completions.create(**{"model": "base", "messages": CHAT, "max_tokens": 6, **kw})


def complete(client: openai.OpenAI, **kw: Any) -> Any:
    return client.completions.create(**{"model": "base", "prompt": "hello there", "max_tokens": 6, **kw})


# ---- item 2: models -------------------------------------------------------------------------------------


def test_models_list_and_get(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"base", "t1"}
    t1 = models["t1"].model_dump()
    assert t1["object"] == "model" and t1["owned_by"] == "softserve" and t1["created"] > 1_600_000_000
    assert t1["method"] == "prompt_tuning" and t1["version"] == 1
    assert models["base"].model_dump()["version"] == 0
    assert client.models.retrieve("t1").model_dump()["method"] == "prompt_tuning"
    assert client.models.retrieve("base").id == "base"


@pytest.mark.parametrize("model", ["nope", "bad id"])
def test_unknown_model_is_404_in_openai_shape(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve(model)
    assert exc.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as exc:
        chat(client, model="nope")
    body: Any = exc.value.body
    assert body["param"] == "model" and body["code"] == "model_not_found" and "nope" in str(exc.value)


# ---- item 3: errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "param", "limit"),
    [
        ({"max_tokens": 100_000}, "max_tokens", "8192"),  # the schema's bound
        ({"max_tokens": MAX_NEW + 1}, "max_tokens", str(MAX_NEW)),  # the configured cap, by its client name
        ({"max_tokens": None, "max_completion_tokens": MAX_NEW + 1}, "max_completion_tokens", str(MAX_NEW)),
        ({"temperature": 2.5}, "temperature", "2"),
        ({"n": 17}, "n", "16"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs", "20"),
        ({"presence_penalty": -3}, "presence_penalty", "-2"),
        ({"logit_bias": {"5": 101}}, "logit_bias", "100"),
        ({"logit_bias": {"999999": 1}}, "logit_bias", "259"),  # outside the vocabulary
        ({"messages": [{"role": "user", "content": "x"}] * 257}, "messages", "256"),
    ],
)
def test_invalid_values_name_the_field_and_limit(
    client: openai.OpenAI, kw: dict[str, Any], param: str, limit: str
) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as exc:
        chat(client, **kw)
    body: Any = exc.value.body
    assert set(body) == {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"
    assert body["param"].startswith(param) and param in str(exc.value) and limit in str(exc.value)


def test_unknown_parameter_is_named(client: openai.OpenAI) -> None:
    for call in (chat, complete):
        with pytest.raises(openai.UnprocessableEntityError) as exc:
            call(client, extra_body={"top_k_typo": 3})
        assert exc.value.body["param"] == "top_k_typo" and "top_k_typo" in str(exc.value)  # type: ignore[index]


def test_framework_errors_on_v1_use_openai_shape_native_routes_keep_theirs(server: tuple[str, Any]) -> None:
    url = server[0]
    r = httpx.post(
        f"{url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(f"{url}/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 100_000})
    assert r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(f"{url}/generate", json={"prompt": "x", "max_new_tokens": 100_000})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "max_new_tokens"]
    r = httpx.post(f"{url}/generate", json={"task_id": "nope", "prompt": "x"})
    assert (
        r.status_code == 404 and r.json()["error"]["type"] == "not_found" and "param" not in r.json()["error"]
    )


# ---- item 5: refused parameters -------------------------------------------------------------------------

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
REFUSED_CHAT: dict[str, tuple[dict[str, Any], str]] = {
    "tools": ({"tools": [TOOL]}, "tools"),
    "tool_choice": ({"tool_choice": "auto"}, "tool_choice"),
    "functions": ({"functions": [TOOL["function"]]}, "functions"),
    "function_call": ({"function_call": "auto"}, "function_call"),
    "json_object": ({"response_format": {"type": "json_object"}}, "response_format"),
    "json_schema": (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        "response_format",
    ),
    "audio": ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    "modalities": ({"modalities": ["text", "audio"]}, "modalities"),
    "prediction": ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    "reasoning_effort": ({"reasoning_effort": "low"}, "reasoning_effort"),
    "verbosity": ({"verbosity": "low"}, "verbosity"),
    "web_search_options": ({"web_search_options": {}}, "web_search_options"),
    "store": ({"store": True}, "store"),
    "service_tier": ({"service_tier": "flex"}, "service_tier"),
    "obfuscation": (
        {"stream": True, "stream_options": {"include_obfuscation": True}},
        "stream_options.include_obfuscation",
    ),
    "options-no-stream": ({"stream_options": {"include_usage": True}}, "stream_options"),
    "top_logprobs-alone": ({"top_logprobs": 2}, "top_logprobs"),
    "both-limits": ({"max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens"),
    "image": (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages[0].content[0]",
    ),
    "tool-role": ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages[0].role"),
    "name": ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages[0].name"),
}
REFUSED_COMPLETIONS: dict[str, tuple[dict[str, Any], str]] = {
    "suffix": ({"suffix": "end"}, "suffix"),
    "best_of": ({"best_of": 3}, "best_of"),
    "echo+logprobs": ({"echo": True, "logprobs": 1}, "echo"),
}


@pytest.mark.parametrize("case", list(REFUSED_CHAT))
def test_refused_chat_parameters_are_named(client: openai.OpenAI, case: str) -> None:
    kw, param = REFUSED_CHAT[case]
    with pytest.raises(openai.BadRequestError) as exc:
        chat(client, **kw)
    body: Any = exc.value.body
    assert body["param"] == param and param in str(exc.value) and body["type"] == "invalid_request_error"
    if "stream_options" not in kw:  # refused before a stream starts, too
        with pytest.raises(openai.BadRequestError) as exc:
            chat(client, **{**kw, "stream": True})
        assert exc.value.body["param"] == param  # type: ignore[index]


@pytest.mark.parametrize("case", list(REFUSED_COMPLETIONS))
def test_refused_completion_parameters_are_named(client: openai.OpenAI, case: str) -> None:
    kw, param = REFUSED_COMPLETIONS[case]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as exc:
            complete(client, stream=stream, **kw)
        assert exc.value.body["param"] == param and param in str(exc.value)  # type: ignore[index]


def test_harmless_parameters_change_nothing(client: openai.OpenAI) -> None:
    plain = chat(client)
    same = chat(
        client,
        metadata={"k": "v"},
        store=False,
        service_tier="auto",
        user="someone",
        prompt_cache_key="k",
        safety_identifier="s",
        parallel_tool_calls=False,
        tool_choice="none",
        response_format={"type": "text"},
        modalities=["text"],
    )
    assert same.choices[0].message.content == plain.choices[0].message.content
    assert complete(client, best_of=2, n=2).choices[1].text == complete(client, n=2).choices[1].text


# ---- item 4: honoured request and response features ----------------------------------------------------


def test_max_completion_tokens_is_honoured(client: openai.OpenAI) -> None:
    for n in (1, 3):
        out = chat(client, max_tokens=None, max_completion_tokens=n, logit_bias={"2": -100})  # never EOS
        assert out.usage.completion_tokens == n and out.choices[0].finish_reason == "length"


def test_system_fingerprint_names_the_task_version(client: openai.OpenAI) -> None:
    assert chat(client, model="t1").system_fingerprint == "t1@1"
    assert complete(client).system_fingerprint == "base"
    chunks = list(chat(client, model="t1", stream=True))
    assert {c.system_fingerprint for c in chunks} == {"t1@1"}


def test_developer_role_is_system_and_text_parts_are_content(client: openai.OpenAI) -> None:
    as_system = chat(client, messages=[{"role": "system", "content": "be brief"}, *CHAT])
    as_developer = chat(client, messages=[{"role": "developer", "content": "be brief"}, *CHAT])
    assert as_developer.choices[0].message.content == as_system.choices[0].message.content
    assert as_developer.usage.prompt_tokens == as_system.usage.prompt_tokens
    parts = [{"type": "text", "text": "hello"}, {"type": "text", "text": "there"}]
    joined = chat(client, messages=[{"role": "user", "content": "hello\nthere"}])
    as_parts = chat(client, messages=[{"role": "user", "content": parts}])
    assert as_parts.choices[0].message.content == joined.choices[0].message.content
    assert as_parts.usage.prompt_tokens == joined.usage.prompt_tokens
    assert as_system.usage.prompt_tokens != chat(client).usage.prompt_tokens  # the system text was used


def test_stream_starts_with_the_assistant_role_and_ends_with_usage(client: openai.OpenAI) -> None:
    whole = chat(client, n=2, temperature=0.9, seed=4)
    chunks = list(
        chat(client, n=2, temperature=0.9, seed=4, stream=True, stream_options={"include_usage": True})
    )
    firsts = {c.choices[0].index: c.choices[0].delta for c in reversed(chunks) if c.choices}
    assert all(d.role == "assistant" for d in firsts.values()) and set(firsts) == {0, 1}
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    for i in (0, 1):
        text = "".join(
            c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i
        )
        assert text == whole.choices[i].message.content
    no_usage = list(chat(client, stream=True))
    assert no_usage[-1].choices and all(c.usage is None for c in no_usage)


def test_completions_list_of_prompts_each_its_own_choices(client: openai.OpenAI) -> None:
    prompts = ["hello there", "zebra", "a b c"]
    alone = [complete(client, prompt=p, n=2, temperature=0.8, seed=9) for p in prompts]
    together = complete(client, prompt=prompts, n=2, temperature=0.8, seed=9)
    assert [c.index for c in together.choices] == list(range(6))
    assert [c.text for c in together.choices] == [c.text for a in alone for c in a.choices]
    assert together.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    streamed: dict[int, str] = {}
    for chunk in complete(client, prompt=prompts, n=2, temperature=0.8, seed=9, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {c.index: c.text for c in together.choices}
    ids = [[104, 101, 108], [122, 101]]  # prompts as token ids
    by_ids = complete(client, prompt=ids)
    assert by_ids.usage.prompt_tokens == 5 and len(by_ids.choices) == 2


def test_echo_prepends_the_prompt(client: openai.OpenAI) -> None:
    plain = complete(client)
    echoed = complete(client, echo=True)
    assert echoed.choices[0].text == "hello there" + plain.choices[0].text
    streamed = "".join(c.choices[0].text for c in complete(client, echo=True, stream=True) if c.choices)
    assert streamed == echoed.choices[0].text


def test_user_is_logged_as_a_hash_only(client: openai.OpenAI, caplog: pytest.LogCaptureFixture) -> None:
    user = "alice@example.com-7f3a"
    with caplog.at_level(logging.INFO, logger="softserve"):
        chat(client, user=user)
        complete(client, user=user)
    digest = hashlib.sha256(user.encode()).hexdigest()[:16]
    assert sum(digest in r.getMessage() for r in caplog.records) == 2
    assert user not in caplog.text


def test_generation_errors_end_a_stream_with_an_openai_error(
    server: tuple[str, Any], client: openai.OpenAI
) -> None:
    """A choice that fails mid-stream (here: its deadline passes) raises in the client, not a clean stop."""
    _, state = server
    timeout = state.settings.request_timeout_s
    state.settings.request_timeout_s = 0.0  # deadline already passed when the engine first looks
    try:
        with pytest.raises(openai.APIError) as exc:
            list(chat(client, stream=True))
        assert "timeout" in str(exc.value)
        with pytest.raises(openai.APIStatusError) as exc2:
            chat(client)
        assert exc2.value.status_code == 504 and exc2.value.body["param"] == "timeout"  # type: ignore[index]
    finally:
        state.settings.request_timeout_s = timeout
