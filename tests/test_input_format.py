"""The artifact carries its input format (issue 14 item 4): the manifest records whether training used the
chat template and which system prompt; the server formats a plain `prompt` the same way, gives `messages`
the recorded system prompt (a client's own system message replaces it), and reads version-1 manifests as
raw text, as they were always served."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from api_helpers import serving, upload
from upload_helpers import artifact_with_manifest, manifest_dict, peft_adapter, prompt_tensors

from prompt_store import RAW_FORMAT, ArtifactFormatError, Fingerprint, InputFormat, from_bytes, make_artifact
from prompt_store import to_bytes as artifact_bytes
from prompt_store.types import FORMAT_VERSION
from server.tokenization import encode_chat, encode_text

TEXT = "a great movie"
USER = [{"role": "user", "content": TEXT}]


def task_bytes(task_id: str, base: Fingerprint, fmt: InputFormat = RAW_FORMAT) -> bytes:
    cfg = {"num_virtual_tokens": 4}
    return artifact_bytes(
        make_artifact(task_id, "prompt_tuning", cfg, prompt_tensors(base), base, input_format=fmt)
    )


def generate(client: Any, task_id: str, **body: Any) -> dict[str, Any]:
    r = client.post("/generate", json={"task_id": task_id, "max_new_tokens": 4, "logprobs": 0, **body})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def same_answer(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["usage"]["prompt_tokens"] == b["usage"]["prompt_tokens"]
    assert a["tokens"] == b["tokens"]
    assert [t["logprob"] for t in a["logprobs"]] == pytest.approx([t["logprob"] for t in b["logprobs"]])


def test_a_chat_trained_task_answers_a_prompt_as_the_same_chat(tmp_path: Path) -> None:
    with serving(tmp_path) as (client, state):
        tok = state.runner.tokenizer
        chat_task = task_bytes("chat", state.runner.fingerprint, InputFormat(True))
        assert upload(client, "chat", chat_task).status_code == 201
        as_prompt, as_chat = generate(client, "chat", prompt=TEXT), generate(client, "chat", messages=USER)
        same_answer(as_prompt, as_chat)
        assert as_prompt["usage"]["prompt_tokens"] == len(encode_chat(tok, USER))
        completion = client.post("/v1/completions", json={"model": "chat", "prompt": TEXT, "max_tokens": 4})
        chat = client.post("/v1/chat/completions", json={"model": "chat", "messages": USER, "max_tokens": 4})
        c, m = completion.json(), chat.json()
        assert c["usage"]["prompt_tokens"] == m["usage"]["prompt_tokens"] == len(encode_chat(tok, USER))
        assert c["choices"][0]["text"] == m["choices"][0]["message"]["content"]
        info = client.get("/tasks/chat").json()
        assert info["input_format"] == {"chat_template": True, "system_prompt": None}


def test_a_raw_trained_task_and_the_bare_model_keep_the_raw_prompt(tmp_path: Path) -> None:
    with serving(tmp_path) as (client, state):
        tok = state.runner.tokenizer
        assert upload(client, "raw", task_bytes("raw", state.runner.fingerprint)).status_code == 201
        for task in ("raw", "base"):
            as_prompt, as_chat = generate(client, task, prompt=TEXT), generate(client, task, messages=USER)
            assert as_prompt["usage"]["prompt_tokens"] == len(encode_text(tok, TEXT))
            assert as_chat["usage"]["prompt_tokens"] == len(encode_chat(tok, USER))
        raw = {"chat_template": False, "system_prompt": None}
        assert client.get("/tasks/raw").json()["input_format"] == raw
        files = [("file", (name, data)) for name, data in peft_adapter(state.runner.fingerprint).items()]
        assert client.put("/tasks/peft", files=files).status_code == 201
        assert client.get("/tasks/peft").json()["input_format"] == raw  # PEFT imports: raw, as before


def test_the_recorded_system_prompt_applies_unless_the_client_sends_its_own(tmp_path: Path) -> None:
    with serving(tmp_path) as (client, state):
        tok = state.runner.tokenizer
        fmt = InputFormat(True, "Answer in one word.")
        assert upload(client, "sys", task_bytes("sys", state.runner.fingerprint, fmt)).status_code == 201
        recorded = [{"role": "system", "content": "Answer in one word."}, *USER]
        own = [{"role": "system", "content": "Be verbose."}, *USER]
        as_prompt, as_chat = generate(client, "sys", prompt=TEXT), generate(client, "sys", messages=USER)
        same_answer(as_prompt, as_chat)
        same_answer(as_chat, generate(client, "sys", messages=recorded))
        assert as_chat["usage"]["prompt_tokens"] == len(encode_chat(tok, recorded))
        replaced = generate(client, "sys", messages=own)
        assert replaced["usage"]["prompt_tokens"] == len(encode_chat(tok, own))  # the client's replaces it
        assert client.get("/tasks/sys").json()["input_format"]["system_prompt"] == "Answer in one word."


def v1_manifest(base: Fingerprint) -> dict[str, Any]:
    d = manifest_dict("old", base)
    del d["input_format"]
    return {**d, "format_version": 1}


def test_a_version_1_manifest_still_loads_as_raw_text(tiny_fingerprint: Fingerprint, tmp_path: Path) -> None:
    assert FORMAT_VERSION == 2 and "input_format" in manifest_dict("t", tiny_fingerprint)
    art = from_bytes(artifact_with_manifest(json.dumps(v1_manifest(tiny_fingerprint)), tiny_fingerprint))
    assert art.manifest.input_format == RAW_FORMAT
    with serving(tmp_path) as (client, state):
        old = artifact_with_manifest(
            json.dumps(v1_manifest(state.runner.fingerprint)), state.runner.fingerprint
        )
        assert upload(client, "old", old).status_code == 201
        assert client.get("/tasks/old").json()["input_format"] == {
            "chat_template": False,
            "system_prompt": None,
        }
        got = generate(client, "old", prompt=TEXT)
        assert got["usage"]["prompt_tokens"] == len(encode_text(state.runner.tokenizer, TEXT))


BAD_FORMATS = [
    ("chat", "input_format"),
    ({"chat_template": "yes", "system_prompt": None}, "input_format.chat_template"),
    ({"chat_template": True, "system_prompt": 7}, "input_format.system_prompt"),
    ({"chat_template": False, "system_prompt": "hi"}, "input_format.system_prompt"),
    ({"chat_template": True, "system_prompt": None, "template": "x"}, "input_format"),
    (None, "input_format"),  # a version-2 manifest without it
]


@pytest.mark.parametrize(("value", "field"), BAD_FORMATS)
def test_a_bad_input_format_is_refused_naming_the_field(
    tiny_fingerprint: Fingerprint, value: Any, field: str
) -> None:
    d = manifest_dict("t", tiny_fingerprint, input_format=value)
    if value is None:
        del d["input_format"]
    with pytest.raises(ArtifactFormatError) as err:
        from_bytes(artifact_with_manifest(json.dumps(d), tiny_fingerprint))
    assert err.value.field == field and field in str(err.value)


def test_a_bad_input_format_upload_is_4xx_and_changes_nothing(tmp_path: Path) -> None:
    with serving(tmp_path) as (client, state):
        base = state.runner.fingerprint
        assert upload(client, "t", task_bytes("t", base, InputFormat(True))).status_code == 201
        before = client.get("/tasks/t").json()
        for value, field in BAD_FORMATS:
            d = manifest_dict("t", base, input_format=value)
            if value is None:
                del d["input_format"]
            r = upload(client, "t", artifact_with_manifest(json.dumps(d), base))
            assert 400 <= r.status_code < 500 and field in r.text, (r.status_code, r.text[:300])
        assert client.get("/tasks/t").json() == before
        assert state.store.info("t").versions == (1,)


def test_training_exports_the_format_it_trained_with(tmp_path: Path) -> None:
    from api_helpers import tiny_runner

    from prompt_store import load
    from training.data import Record
    from training.loop import TrainConfig
    from training.model import LoadedModel
    from training.pipeline import DataSplit, TaskRunConfig, train_task

    lm = LoadedModel(tiny_runner())
    data = DataSplit([Record("good film", "positive"), Record("dull film", "negative")], [])
    cfg = TrainConfig(steps=1, batch_size=2, progress=False)
    for chat, want in ((None, InputFormat(True)), (False, RAW_FORMAT)):
        run_cfg = TaskRunConfig(
            "prompt_tuning", "t", cfg, {"num_virtual_tokens": 2}, tmp_path / str(chat), chat=chat
        )
        run = train_task(lm, data, run_cfg)
        assert run.artifact.manifest.input_format == want
        assert run.artifact_path is not None and load(run.artifact_path).manifest.input_format == want


def test_an_accept_delta_lands_on_the_user_text_under_the_recorded_system_prompt(tmp_path: Path) -> None:
    """train = serve for SCAP under a recorded system prompt: the user text starts after that prompt's
    head, and the delta is added there (not at the default head's length, not at 0)."""
    from test_accept_user_text import accept_config, accept_tensors, reference_logprobs

    from prompt_store import to_serving_form
    from runtime.input_format import chat_head_ids, task_messages, user_text_offset

    with serving(tmp_path) as (client, state):
        runner, system = state.runner, "Answer in one word."
        tensors = accept_tensors(runner.hidden_size)
        fmt = InputFormat(True, system)
        art = make_artifact(
            "acc", "accept", accept_config("user_text"), tensors, runner.fingerprint, input_format=fmt
        )
        assert upload(client, "acc", artifact_bytes(art)).status_code == 201
        got = generate(client, "acc", prompt=TEXT, max_new_tokens=1)
        ids = encode_chat(runner.tokenizer, task_messages(TEXT, system))
        k = user_text_offset(runner.tokenizer, ids, system)
        assert k == len(chat_head_ids(runner.tokenizer, system)) > len(chat_head_ids(runner.tokenizer))
        assert runner.tokenizer.decode(ids[k : k + len(TEXT)]) == TEXT
        want = reference_logprobs(runner, to_serving_form(art), ids, k)
        at_start = reference_logprobs(runner, to_serving_form(art), ids, 0)  # where the default head puts it
        assert (want - at_start).abs().max() > 1e-2  # the placement matters for this request
        assert got["tokens"] == [int(want.argmax())]
        assert got["logprobs"][0]["logprob"] == pytest.approx(float(want.max()), abs=1e-4)


def test_training_under_a_system_prompt_records_it_and_the_server_reads_a_prompt_the_same_way(
    tmp_path: Path,
) -> None:
    from api_helpers import tiny_runner

    from runtime.input_format import task_messages
    from training.data import Formatter, Record, tokenize
    from training.loop import TrainConfig
    from training.model import LoadedModel
    from training.pipeline import DataSplit, TaskRunConfig, train_task

    system = "Answer in one word."
    lm = LoadedModel(tiny_runner())
    records = [Record(TEXT, "positive"), Record("dull film", "negative")]
    cfg = TrainConfig(steps=1, batch_size=2, progress=False)
    run_cfg = TaskRunConfig(
        "prompt_tuning", "sys", cfg, {"num_virtual_tokens": 2}, None, system_prompt=system
    )
    run = train_task(lm, DataSplit(records, []), run_cfg)
    assert run.artifact.manifest.input_format == InputFormat(True, system)
    trained_ids = list(tokenize(records[:1], lm.tokenizer, None, 512, system)[0].prompt_ids)
    assert trained_ids == encode_chat(lm.tokenizer, task_messages(TEXT, system))
    assert trained_ids != encode_chat(lm.tokenizer, USER)  # the system prompt is in what training read
    with pytest.raises(ValueError, match="system prompt"):
        Formatter(lm.tokenizer, False, system)
    with serving(tmp_path) as (client, _):
        assert upload(client, "sys", artifact_bytes(run.artifact)).status_code == 201
        as_prompt = generate(client, "sys", prompt=TEXT)
        assert as_prompt["usage"]["prompt_tokens"] == len(trained_ids)
        system_chat = [{"role": "system", "content": system}, *USER]
        same_answer(as_prompt, generate(client, "sys", messages=system_chat))
        assert client.get("/tasks/sys").json()["input_format"]["system_prompt"] == system
