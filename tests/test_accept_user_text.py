"""ACCEPT's SCAP delta on the user's text: the artifact says where (`added_at`), the server and training put
it on the same tokens (the first s of the user text, after the chat template's head), and old artifacts
(no `added_at`) keep the delta on the request's first tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from api_helpers import serving, upload
from tiny_tokenizer import tiny_tokenizer

from prompt_store import (
    Fingerprint,
    ValidationError,
    make_artifact,
    to_bytes,
    to_serving_form,
    validate_artifact,
)
from runtime.input_format import chat_head_ids, user_text_offset
from server.tokenization import encode_chat

M, S = 3, 4  # virtual tokens, delta rows


def accept_tensors(d: int, seed: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "prompt_weight": torch.randn(M, 4, 8, generator=g) * 0.3,  # [m, K, r]
        "prompt_codebook": torch.randn(4, 8, d // 4, generator=g),  # [K, r, d/K]
        "added_weight": torch.randn(S, 2, 4, generator=g),  # [s, Ka, ra]
        "added_codebook": torch.randn(2, 4, d // 2, generator=g),  # [Ka, ra, d/Ka]
    }


def accept_config(added_at: str | None) -> dict[str, Any]:
    cfg: dict[str, Any] = {"num_virtual_tokens": M, "num_subspaces": 4, "num_codewords": 8}
    cfg |= {"added_length": S, "added_subspaces": 2, "added_codewords": 4}
    return cfg if added_at is None else cfg | {"added_at": added_at}


def test_offsets_agree_with_the_server_tokenization_and_land_on_the_user_text() -> None:
    from training.data import Formatter, tokenize
    from training.data import Record as Rec

    tok = tiny_tokenizer()
    head = chat_head_ids(tok)
    assert tok.decode(list(head)) == "<s>user\n"
    for text in ("great movie!", "  spaced", "x"):
        ids = encode_chat(tok, [{"role": "user", "content": text}])
        assert Formatter(tok).prompt_ids(text) == ids  # training builds the server's ids
        k = user_text_offset(tok, ids)
        assert k == len(head) and tok.decode(ids[k : k + len(text)]) == text
        (row,) = tokenize([Rec(text, "yes")], tok)
        assert row.added_at == k  # where training adds the delta = where the server does
    assert user_text_offset(tok, tok("plain prompt")["input_ids"]) == 0  # raw prompts: from the start
    no_chat = Formatter(tok, chat=False)
    (row,) = tokenize([Rec("plain", "yes")], tok, chat=False)
    assert row.added_at == 0 and list(row.prompt_ids) == no_chat.prompt_ids("plain")


def test_added_at_is_validated_and_old_artifacts_keep_the_start(tiny_fingerprint: Fingerprint) -> None:
    d = tiny_fingerprint.hidden_size
    tensors = accept_tensors(d)
    old = to_serving_form(make_artifact("old", "accept", accept_config(None), tensors, tiny_fingerprint))
    new = to_serving_form(
        make_artifact("new", "accept", accept_config("user_text"), tensors, tiny_fingerprint)
    )
    assert (old.added_at, new.added_at) == ("start", "user_text")
    with pytest.raises(ValidationError, match="added_at"):
        art = make_artifact("bad", "accept", accept_config("middle"), tensors, tiny_fingerprint)
        validate_artifact(art, tiny_fingerprint)


def reference_logprobs(runner: Any, prompt: Any, ids: list[int], at: int) -> torch.Tensor:
    """Full-recompute next-token log-probs [V]: [SCPP ; token embeds + delta on ids[at : at + s]]."""
    model = runner.model
    with torch.no_grad():
        tokens = model.get_input_embeddings()(torch.tensor([ids]))[0].clone()  # [n, d]
        tokens[at : at + S] += prompt.added[:S]  # [s, d]
        x = torch.cat([prompt.embeds, tokens])[None]  # [1, m + n, d]
        logits = model(inputs_embeds=x, attention_mask=torch.ones(1, x.shape[1], dtype=torch.long)).logits
    return torch.log_softmax(logits[0, -1].float(), dim=-1)  # [V]


@pytest.mark.parametrize("added_at", ["user_text", None])
def test_a_chat_request_gets_the_delta_on_its_user_tokens(tmp_path: Path, added_at: str | None) -> None:
    with serving(tmp_path) as (client, state):
        runner = state.runner
        art = make_artifact(
            "acc", "accept", accept_config(added_at), accept_tensors(runner.hidden_size), runner.fingerprint
        )
        assert upload(client, "acc", to_bytes(art)).status_code in (200, 201)
        messages = [{"role": "user", "content": "a great movie"}]
        body = {"task_id": "acc", "messages": messages, "max_new_tokens": 1, "logprobs": 0}
        got = client.post("/generate", json=body).json()
        ids = encode_chat(runner.tokenizer, messages)
        prompt = to_serving_form(art)
        k = user_text_offset(runner.tokenizer, ids)
        assert k == 6
        on_user, on_start = (reference_logprobs(runner, prompt, ids, at) for at in (k, 0))
        assert (on_user - on_start).abs().max() > 1e-2  # the placement matters for this request
        want = on_user if added_at == "user_text" else on_start  # old artifacts: today's placement
        token = int(want.argmax())
        assert got["tokens"] == [token]
        assert got["logprobs"][0]["logprob"] == pytest.approx(float(want[token]), abs=1e-4)


def test_training_loss_equals_the_served_loss() -> None:
    """train = serve: an ACCEPT trainer's loss on a chat example equals the cross-entropy of the same target
    teacher-forced through the runtime's prefill/decode under its exported artifact."""
    from conftest import tiny_llama

    from runtime.batch_state import decode_one_token, prefill
    from runtime.generate import prefill_items
    from runtime.model_runner import ModelRunner
    from training.data import Record as Rec
    from training.data import collate, tokenize
    from training.methods import build

    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=259)
    runner = ModelRunner.from_model(model, tok, "tiny")
    cfg = {"num_virtual_tokens": M, "num_subspaces": 4, "num_codewords": 8, "added_length": S}
    method = build("accept", model, tok, **cfg, added_subspaces=2, added_codewords=4)
    with torch.no_grad():
        method.added_weight.copy_(
            torch.randn_like(method.added_weight)
        )  # a delta that matters  # [s, Ka, ra]
    (row,) = tokenize([Rec("a great movie", "yes")], tok)
    assert row.added_at == 6
    with torch.no_grad():
        train_loss = float(method.forward(model, collate([row], 0)))
    prompt = to_serving_form(method.export("acc", runner.fingerprint))
    assert prompt.added_at == "user_text"
    state, logits = prefill(runner, prefill_items(runner, prompt, [list(row.prompt_ids)]))  # [1, V]
    nll = []
    for j, target in enumerate(row.target_ids):
        nll.append(-float(torch.log_softmax(logits[0].float(), dim=-1)[target]))
        if j + 1 < len(row.target_ids):
            logits = decode_one_token(runner, state, [target])  # [1, V]
    assert train_loss == pytest.approx(sum(nll) / len(nll), abs=1e-4)
