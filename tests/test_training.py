"""Trainers on a tiny Llama + the byte-level test tokenizer: loss goes down, exports load in prompt_store,
serving forms reproduce the training forward, reparameterised exports, gist mask, checkpoint/resume."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from tiny_tokenizer import tiny_tokenizer

from prompt_store import Fingerprint, SoftPrompt, from_bytes, to_bytes, to_serving_form, validate_artifact
from prompt_store.methods.accept import compose
from training.data import Record, collate, tokenize
from training.generate import greedy_generate, serving_loss
from training.lm import gist_allowed
from training.loop import TrainConfig, lr_factor, train
from training.methods import build, compress

VARIANTS = {
    "prompt_tuning": ("prompt_tuning", {}),
    "prompt_tuning_text": ("prompt_tuning", {"init": "text", "init_text": "answer yes or no"}),
    "p_tuning_mlp": ("p_tuning", {"encoder_hidden_size": 32}),
    "p_tuning_lstm": ("p_tuning", {"encoder_type": "lstm", "encoder_hidden_size": 16}),
    "prefix_tuning": ("prefix_tuning", {"projection_hidden_size": 32}),
    "prefix_tuning_direct": ("prefix_tuning", {"projection": False}),
    "accept": ("accept", {"num_subspaces": 4, "num_codewords": 8}),
    "accept_scap": (
        "accept",
        {"num_subspaces": 4, "num_codewords": 8, "added_length": 3, "added_subspaces": 2},
    ),
    "gist": ("gist", {"num_gist_tokens": 2}),
}
INSTRUCTION = "Answer yes for odd numbers."


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    """The tiny Llama with a 10x LM head: random 64-d logits are too flat for a prompt to move far."""
    m = tiny_llama(vocab_size=259).requires_grad_(False)
    assert not m.config.tie_word_embeddings
    with torch.no_grad():
        m.lm_head.weight.mul_(10)
    return m


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def fp(model) -> Fingerprint:  # type: ignore[no-untyped-def]
    return Fingerprint.from_model(model, "tiny")


def records(n: int = 32) -> list[Record]:
    return [Record(f"n{i}", "yes" if i % 2 else "no", INSTRUCTION) for i in range(n)]


def make(name: str, model, tok):  # type: ignore[no-untyped-def]
    method, opts = VARIANTS[name]
    return (
        build(method, model, tok, num_virtual_tokens=4, **opts)
        if method != "gist"
        else build(method, model, tok, **opts)
    )


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_trainer_lowers_loss_and_keeps_the_base_frozen(name: str, model, tok) -> None:  # type: ignore[no-untyped-def]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = make(name, model, tok)
    result = train(
        method, model, tokenize(records(), tok), TrainConfig(steps=25, batch_size=8, lr=5e-2, progress=False)
    )
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-5:]) / 5
    assert last < first - 0.3, result.losses
    assert not any(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.dtype == torch.float32 for p in method.parameters())


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_export_validates_and_serving_form_reproduces_training(name: str, model, tok, fp) -> None:  # type: ignore[no-untyped-def]
    method = make(name, model, tok)
    with torch.no_grad():  # move off the initialisation so the check is not trivially about init values
        for p in method.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    art = from_bytes(to_bytes(method.export("toy-task", fp)))
    validate_artifact(art, fp)
    examples = tokenize(records(6), tok)
    with torch.no_grad():
        trained = method(model, method.collate(examples, 0))
        if name == "gist":  # the instruction is compressed once; the request then sees only the gist KV
            art = compress(model, tok, art, INSTRUCTION, task_id="toy-gist", model_name="tiny")
            validate_artifact(art, fp)
            assert art.manifest.method_config["next_position"] == len(tok(INSTRUCTION)["input_ids"]) + 2
        served = serving_loss(model, collate(examples, 0), to_serving_form(art))
    torch.testing.assert_close(served, trained, atol=1e-4, rtol=1e-4)


def test_p_tuning_exports_the_encoder_output(model, tok, fp) -> None:  # type: ignore[no-untyped-def]
    for name in ("p_tuning_mlp", "p_tuning_lstm"):
        method = make(name, model, tok)
        x = method.inputs[None]  # [1, m, d]
        if method.lstm is not None:
            x = method.lstm(x)[0]  # [1, m, 2h]
        expected = method.mlp(x)[0]  # [m, d]
        torch.testing.assert_close(
            method.export("t", fp).tensors["prompt"], expected.detach(), atol=1e-6, rtol=1e-5
        )


def test_prefix_export_is_the_mlp_output_split_per_layer(model, tok, fp) -> None:  # type: ignore[no-untyped-def]
    method = make("prefix_tuning", model, tok)
    art = method.export("t", fp)
    L, H, m, Dh = art.tensors["keys"].shape
    flat = method.mlp(method.inputs).detach()  # [m, L*2*H*Dh]
    for layer in range(L):
        for head in range(H):
            for i in range(m):
                row = flat[i].view(L, 2, H, Dh)  # [L, 2, H, Dh]
                assert torch.equal(art.tensors["keys"][layer, head, i], row[layer, 0, head])
                assert torch.equal(art.tensors["values"][layer, head, i], row[layer, 1, head])


def test_accept_exports_factors_and_has_two_learning_rates(model, tok, fp) -> None:  # type: ignore[no-untyped-def]
    opts = {"num_subspaces": 4, "num_codewords": 8, "added_length": 2, "added_subspaces": 2}
    method = build("accept", model, tok, num_virtual_tokens=4, weight_lr=0.5, codebook_lr=0.01, **opts)
    t = method.export("t", fp).tensors
    assert t["prompt_weight"].shape == (4, 4, 8) and t["prompt_codebook"].shape == (4, 8, 16)
    assert t["added_weight"].shape == (2, 2, 8) and t["added_codebook"].shape == (2, 8, 32)
    torch.testing.assert_close(compose(t["prompt_weight"], t["prompt_codebook"]), method.prompt().detach())
    groups = {g["name"]: g for g in method.param_groups(0.1, 0.0)}
    assert groups["prompt_weights"]["lr"] == 0.5 and groups["prompt_codebook"]["lr"] == 0.01
    assert {id(p) for g in groups.values() for p in g["params"]} == {id(p) for p in method.parameters()}


def test_accept_scap_trains_at_its_own_learning_rate(model, tok) -> None:  # type: ignore[no-untyped-def]
    """The reference (ACCEPT's train.py, DePT's --lora_embedding_lr): SCAP's pair in its own AdamW group."""
    from training.loop import TrainConfig, make_optimizer
    from training.methods.accept import ADDED_LR_RATIO

    opts = {"num_virtual_tokens": 4, "num_subspaces": 4, "added_length": 2, "added_subspaces": 2}
    method = build("accept", model, tok, **opts)
    optimizer = make_optimizer(method, TrainConfig(lr=0.3))
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == {
        "prompt_weights": 0.3,
        "prompt_codebook": 0.3,
        "added": pytest.approx(0.3 * ADDED_LR_RATIO),
    }
    added = next(g for g in optimizer.param_groups if g["name"] == "added")
    assert {id(p) for p in added["params"]} == {id(method.added_weight), id(method.added_codebook)}
    given = build("accept", model, tok, added_lr=1e-3, **opts)
    assert {g["name"]: g["lr"] for g in given.param_groups(0.3, 0.0)}["added"] == 1e-3
    no_scap = build("accept", model, tok, **(opts | {"added_length": 0}))
    assert [g["name"] for g in no_scap.param_groups(0.3, 0.0)] == ["prompt_weights", "prompt_codebook"]


def test_accept_text_init_factorises_the_instruction(model, tok) -> None:  # type: ignore[no-untyped-def]
    from training.methods.accept import text_embeddings

    target = text_embeddings(model, tok, INSTRUCTION, 4)  # [4, d]
    opts = {"num_virtual_tokens": 4, "num_subspaces": 4, "init": "text", "init_text": INSTRUCTION}
    full = build("accept", model, tok, num_codewords=6, **opts)  # r >= m: exact
    torch.testing.assert_close(full.prompt().detach(), target, atol=1e-5, rtol=1e-5)
    low = build("accept", model, tok, num_codewords=2, **opts)  # r < m: best rank-2 fit per subspace
    x = target.view(4, 4, -1).transpose(0, 1)  # [K, m, d/K]
    u, sv, vh = torch.linalg.svd(x, full_matrices=False)
    best = (u[:, :, :2] @ torch.diag_embed(sv[:, :2]) @ vh[:, :2]).transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(low.prompt().detach(), best, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        build("accept", model, tok, num_codewords=2, **(opts | {"init": "bogus"}))


def reference_gist_allowed(lengths: list[int], starts: list[int], k: int, width: int) -> torch.Tensor:
    out = torch.zeros(len(lengths), width, width, dtype=torch.bool)
    for b, (n_real, start) in enumerate(zip(lengths, starts, strict=True)):
        for i in range(width):
            for j in range(width):
                if i == j:
                    out[b, i, j] = True
                elif j <= i and j < n_real:
                    out[b, i, j] = not (i >= start + k and j < start)
    return out


def test_gist_mask_matches_a_plain_reference() -> None:
    lengths, starts = [9, 6, 12], [3, 1, 5]
    got = gist_allowed(torch.tensor(lengths), torch.tensor(starts), 2, 12)
    assert torch.equal(got, reference_gist_allowed(lengths, starts, 2, 12))
    assert not got[0, 5, 2] and got[0, 4, 2] and got[0, 5, 4]  # after gists: no instruction, gists visible


def test_gist_collate_layout(tok) -> None:  # type: ignore[no-untyped-def]
    method = build("gist", tiny_llama(vocab_size=259), tok, num_gist_tokens=3)
    ex = tokenize([Record("n1", "yes", INSTRUCTION)], tok)[0]
    batch = method.collate([ex], 0)
    n = len(ex.instruction_ids)
    assert int(batch.gist_start[0]) == n and batch.num_gist == 3
    assert batch.input_ids[0, :n].tolist() == list(ex.instruction_ids)
    assert batch.input_ids[0, n + 3 : n + 3 + len(ex.prompt_ids)].tolist() == list(ex.prompt_ids)
    assert (batch.labels[0] != -100).sum() == len(ex.target_ids)


def test_checkpoint_resume_equals_an_uninterrupted_run(model, tok, tmp_path) -> None:  # type: ignore[no-untyped-def]
    examples = tokenize(records(), tok)
    cfg = TrainConfig(
        steps=8, batch_size=4, grad_accum=2, lr=5e-2, warmup_steps=2, checkpoint_every=2, progress=False
    )
    straight = make("accept_scap", model, tok)
    full = train(straight, model, examples, cfg, out_dir=tmp_path / "a")

    def crash(step: int, loss: float) -> None:
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(make("accept_scap", model, tok), model, examples, cfg, out_dir=tmp_path / "b", on_step=crash)
    resumed = make("accept_scap", model, tok)
    rest = train(resumed, model, examples, cfg, out_dir=tmp_path / "b", resume=True)
    assert rest.start_step == 4
    assert rest.losses == full.losses
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert (tmp_path / "b" / "log.json").is_file() and (tmp_path / "b" / "loss.png").stat().st_size > 1000


def test_lr_schedule_warms_up_then_decays() -> None:
    factors = [lr_factor(s, 10, 2) for s in range(10)]
    assert factors[:3] == [0.5, 1.0, 1.0] and factors[-1] == pytest.approx(1 / 8)
    assert all(a >= b for a, b in zip(factors[1:], factors[2:], strict=False))


def test_greedy_generate_matches_hf_generate_with_an_embedding_prefix(model, tok) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    prompt = SoftPrompt(embeds=torch.randn(3, 64) * 0.5, next_position=3)
    rows = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
    got = greedy_generate(model, rows, prompt, max_new_tokens=5, stop_ids=set())
    emb = model.get_input_embeddings()
    for row, out in zip(rows, got, strict=True):
        x = torch.cat([prompt.embeds, emb(torch.tensor(row))])[None]  # [1, m+n, d]
        mask = torch.ones(1, x.shape[1], dtype=torch.long)  # [1, m+n]
        ref = model.generate(
            inputs_embeds=x,
            attention_mask=mask,
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
        assert out == ref[0, -5:].tolist()
