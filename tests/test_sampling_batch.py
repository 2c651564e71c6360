"""server.sampling over a batch: penalties, logit_bias and log-probs vectorised over the rows that ask,
equal to each row alone and to the hand-computed reference; plain rows untouched; failures per row."""

from __future__ import annotations

import pytest
import torch
from sampling_refs import penalised

from server.requests import SamplingParams, TokenEvent
from server.sampling import RowSampler, Sampled, process_logits, sample_batch

V = 50
PARAMS = [
    SamplingParams(),  # plain greedy
    SamplingParams(presence_penalty=1.2, logprobs=3),
    SamplingParams(frequency_penalty=-0.7, repetition_penalty=1.8),
    SamplingParams(temperature=0.9, seed=3, logit_bias=((4, 6.0), (9, -100.0))),
    SamplingParams(temperature=0.8, top_p=0.9, seed=4, logprobs=0),  # sampled, no processing
    SamplingParams(repetition_penalty=0.5, presence_penalty=2.0, frequency_penalty=2.0, logprobs=5),
]


def samplers(params: list[SamplingParams]) -> list[RowSampler]:
    return [RowSampler.create(p, torch.device("cpu"), V) for p in params]


def step_logits(step: int) -> torch.Tensor:
    return torch.randn(len(PARAMS), V, generator=torch.Generator().manual_seed(step)) * 3  # [B, V]


def test_batched_rows_equal_each_row_alone_and_the_reference() -> None:
    together, alone = samplers(PARAMS), [samplers([p]) for p in PARAMS]
    history: list[list[int]] = [[] for _ in PARAMS]
    for step in range(12):
        logits = step_logits(step)  # [B, V]
        batch = sample_batch(logits, together)
        for b, p in enumerate(PARAMS):
            single = sample_batch(logits[b : b + 1], alone[b])[0]
            assert isinstance(single, Sampled) and batch[b] == single
            ref = penalised(
                logits[b],
                history[b],
                presence=p.presence_penalty,
                frequency=p.frequency_penalty,
                repetition=p.repetition_penalty,
                bias=dict(p.logit_bias),
            )  # [V]
            if p.temperature == 0:
                assert single.token == int(torch.argmax(ref))
            lp = torch.log_softmax(ref, -1)  # [V]
            if p.logprobs is None:
                assert single.logprob is None and single.top_logprobs == ()
            else:
                assert single.logprob == pytest.approx(float(lp[single.token]), abs=1e-5)
                top = torch.topk(lp, p.logprobs)
                assert [t for t, _ in single.top_logprobs] == top.indices.tolist()
            history[b].append(single.token)


def test_plain_rows_are_not_copied_or_changed() -> None:
    logits = step_logits(0)  # [B, V]
    plain = samplers([SamplingParams(), SamplingParams(temperature=0.7, seed=1, logprobs=2)] * 3)
    assert process_logits(logits, plain) is logits  # nothing to process: the very same tensor
    mixed = samplers(PARAMS)
    scores = process_logits(logits, mixed)  # [B, V]
    assert torch.equal(scores[0], logits[0]) and torch.equal(scores[4], logits[4])
    assert not torch.equal(scores[3], logits[3])


@pytest.mark.parametrize("repetition", [0.01, 10.0])
@pytest.mark.parametrize("penalty", [-2.0, 2.0])
@pytest.mark.parametrize("bias", [-100.0, 100.0])
def test_every_accepted_extreme_stays_finite(repetition: float, penalty: float, bias: float) -> None:
    p = SamplingParams(
        repetition_penalty=repetition,
        presence_penalty=penalty,
        frequency_penalty=penalty,
        logit_bias=tuple((t, bias) for t in range(V)),
        logprobs=20,
        temperature=1e-30,
    )
    rows = samplers([p])
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(1)) * 30  # [1, V]
    for _ in range(8192 // 512):  # many repeats of each token
        for token in range(V):
            rows[0].observe(token)
    (out,) = sample_batch(logits, rows)
    assert isinstance(out, Sampled) and out.logprob is not None and torch.isfinite(torch.tensor(out.logprob))


def test_a_bad_row_fails_alone() -> None:
    with pytest.raises(ValueError, match="logit_bias token id 60"):
        RowSampler.create(SamplingParams(logit_bias=((60, 1.0),)), torch.device("cpu"), V)
    rows = samplers(PARAMS[:3])
    broken = RowSampler(SamplingParams(logit_bias=((60, 1.0),)), None)  # past this logits' V
    logits = step_logits(2)[:4]  # [4, V]
    out = sample_batch(logits, [*rows, broken])
    assert isinstance(out[3], Exception)
    assert out[:3] == [sample_batch(logits[b : b + 1], samplers([PARAMS[b]]))[0] for b in range(3)]


def test_annotate_attaches_logprobs_to_token_events_only() -> None:
    s = Sampled(7, -1.5, ((7, -1.5), (3, -2.0)))
    assert s.annotate(TokenEvent(7, "x")).top_logprobs == ((7, -1.5), (3, -2.0))
    assert s.annotate(TokenEvent(None, "", finish_reason="stop")).logprob is None
    assert Sampled(7).annotate(TokenEvent(7, "x")).logprob is None
