"""Batched sampling (server.sampling.sample_batch): a seeded row draws the same tokens alone and in any batch
(other seeds, greedy rows, any position), its draws follow softmax(filter(scores / T)) for top-k / top-p,
a row's failure stays its own, and one call moves data from the device to the host once."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from server.requests import SamplingParams
from server.sampling import NonFiniteLogits, RowSampler, Sampled, sample_batch

V = 200
TARGETS = [
    SamplingParams(temperature=0.9, seed=7),
    SamplingParams(temperature=0.7, top_p=0.8, seed=8),
    SamplingParams(temperature=1.3, top_k=5, seed=9),
    SamplingParams(temperature=1.0, top_k=20, top_p=0.95, seed=10, presence_penalty=0.5, logprobs=2),
]
MATES = [
    SamplingParams(),  # greedy
    SamplingParams(temperature=0.9, seed=7),  # the same seed as a target, its own generator
    SamplingParams(temperature=1.1, top_p=0.5, seed=123, logprobs=1),
    SamplingParams(temperature=0.6, top_k=3, seed=5, frequency_penalty=0.3),
    SamplingParams(temperature=1e-6, top_p=0.9, seed=1),  # greedy by temperature
]
STEPS = 10


def sampler(p: SamplingParams, vocab: int = V) -> RowSampler:
    return RowSampler.create(p, torch.device("cpu"), vocab)


def row_logits(step: int, row: int) -> torch.Tensor:
    return torch.randn(V, generator=torch.Generator().manual_seed(1000 * step + row)) * 2  # [V]


def run(params: list[SamplingParams], logit_rows: list[int]) -> list[list[Sampled | Exception]]:
    """Per row, its results over STEPS steps of one batch; row b reads the logits seeded by logit_rows[b]."""
    rows = [sampler(p) for p in params]
    out: list[list[Sampled | Exception]] = [[] for _ in params]
    for step in range(STEPS):
        logits = torch.stack([row_logits(step, r) for r in logit_rows])  # [B, V]
        before = logits.clone()  # [B, V]
        for b, result in enumerate(sample_batch(logits, rows)):
            out[b].append(result)
        assert torch.equal(logits, before)  # the caller's logits are never changed
    return out


@pytest.mark.parametrize("target", range(len(TARGETS)))
def test_a_seeded_row_draws_the_same_alone_and_in_any_batch(target: int) -> None:
    alone = run([TARGETS[target]], [target])[0]
    assert all(isinstance(r, Sampled) for r in alone)
    tokens = [r.token for r in alone if isinstance(r, Sampled)]
    greedy = [int(torch.argmax(row_logits(s, target))) for s in range(STEPS)]
    assert tokens != greedy  # it really samples
    for position in (0, 2, len(MATES)):
        params = [*MATES[:position], TARGETS[target], *MATES[position:]]
        logit_rows = (
            [50 + b for b in range(position)] + [target] + [60 + b for b in range(position, len(MATES))]
        )
        assert run(params, logit_rows)[position] == alone, position
    everyone = [*TARGETS, *MATES]  # all targets together, each reading its own logits
    together = run(everyone, [*range(len(TARGETS)), *range(70, 70 + len(MATES))])
    assert together[target] == alone


def test_rows_with_equal_seeds_and_logits_draw_equal_tokens_in_one_batch() -> None:
    out = run([TARGETS[1]] * 4, [1] * 4)
    assert out[0] == out[1] == out[2] == out[3] == run([TARGETS[1]], [1])[0]


def expected_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Reference [V] float64: softmax(logits / T), keep the top k, renormalise, keep the smallest prefix
    (by probability) whose mass reaches top_p, renormalise."""
    probs = torch.softmax(logits.double() / temperature, -1)  # [V]
    order = torch.argsort(probs, descending=True).tolist()
    keep = order[:top_k] if top_k else order
    mass = sum(float(probs[t]) for t in keep)
    nucleus, seen = [], 0.0
    for t in keep:
        if seen >= top_p * mass:
            break
        nucleus.append(t)
        seen += float(probs[t])
    out = torch.zeros_like(probs)  # [V]
    out[nucleus] = probs[nucleus]
    return out / out.sum()


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.5, 4, 1.0), (1.0, 0, 0.75), (2.0, 5, 0.9)],
)
def test_draws_follow_the_filtered_distribution(temperature: float, top_k: int, top_p: float) -> None:
    """A chi-square check with fixed seeds (deterministic): 200 rows of distinct seeds x 20 steps."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.8, 0.5, 0.0, -0.5, -1.0])  # [8]
    rows = [
        sampler(SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=s), 8)
        for s in range(200)
    ]
    counts: Counter[int] = Counter()
    for _ in range(20):
        for r in sample_batch(logits.expand(len(rows), 8), rows):
            assert isinstance(r, Sampled)
            counts[r.token] += 1
    want = expected_probs(logits, temperature, top_k, top_p) * sum(counts.values())  # [8]
    kept = [t for t in range(8) if want[t] > 0]
    assert set(counts) <= set(kept)  # nothing outside top-k / the nucleus
    chi2 = sum((counts[t] - float(want[t])) ** 2 / float(want[t]) for t in kept)
    assert chi2 < 22.5, (chi2, counts, want.tolist())  # df <= 7, p = 0.002


def test_a_row_that_cannot_draw_fails_alone() -> None:
    logits = torch.stack([row_logits(0, r) for r in range(4)])  # [4, V]
    logits[2, :2] = torch.tensor([3e38, -3e38])  # finite, but 3e38 / 0.5 overflows to inf
    params = [TARGETS[0], TARGETS[1], SamplingParams(temperature=0.5, seed=3), TARGETS[3]]
    rows = [sampler(p) for p in params]
    broken = RowSampler(SamplingParams(temperature=1.0), object())  # type: ignore[arg-type]  # not a generator
    out = sample_batch(torch.cat([logits, row_logits(0, 9)[None]]), [*rows, broken])  # [5, V]
    assert isinstance(out[2], NonFiniteLogits) and isinstance(out[4], Exception)
    for b in (0, 1, 3):
        assert out[b] == sample_batch(logits[b : b + 1], [sampler(params[b])])[0]


def test_rows_that_fail_together_are_drawn_alone_with_the_same_draw() -> None:
    """A row the vectorised step cannot take (logprobs -1, which the API refuses) makes the batch fall back
    to one row at a time: that row fails alone, the others get exactly their tokens alone."""
    logits = torch.stack([row_logits(1, r) for r in range(4)])  # [4, V]
    params = [*TARGETS[:3], SamplingParams(temperature=0.8, seed=2, logprobs=-1)]
    out = sample_batch(logits, [sampler(p) for p in params])
    assert isinstance(out[3], RuntimeError)
    for b in range(3):
        assert out[b] == sample_batch(logits[b : b + 1], [sampler(params[b])])[0]


READS = ("tolist", "item", "__int__", "__float__", "__bool__", "__index__", "cpu", "numpy", "__array__")


@pytest.fixture
def host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every way Python code reads a tensor's values to the host, counted."""
    seen: list[str] = []

    def counted(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            seen.append(name)
            return original(self, *args, **kwargs)

        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    yield seen


def test_one_device_to_host_transfer_per_call(host_reads: list[str]) -> None:
    params = [*TARGETS, *MATES, SamplingParams(logit_bias=((3, 5.0),), logprobs=4)]
    rows = [sampler(p) for p in params]
    for step in range(3):
        logits = torch.stack([row_logits(step, r) for r in range(len(params))])  # [B, V]
        logits[1, 5] = float("nan")  # a failing row: its flag comes back with the tokens
        host_reads.clear()
        out = sample_batch(logits, rows)
        assert host_reads == ["tolist"], step
        assert isinstance(out[1], NonFiniteLogits)
        assert all(isinstance(r, Sampled) for b, r in enumerate(out) if b != 1)
