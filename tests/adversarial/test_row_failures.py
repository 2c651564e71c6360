"""A failure that belongs to one row fails that row alone; a failed shared forward is retried row by row.

The model is the real tiny Llama. Faults are injected where nothing else can produce them on demand: a
runner whose model emits NaN logits for the row that reaches a chosen position, a decoder layer that raises
midway through the forward (after the first layer has written its cache column) for the row at a chosen
position or for any forward of more than one row, and a tokenizer that cannot decode one token. Every
normal request must end with exactly the tokens it gets when it runs alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import tiny_llama
from engine_refs import IdTokenizer, accept_prompt, random_ids, random_prompt, request, task

from prompt_store import SoftPrompt
from runtime.model_runner import ModelRunner
from server.engine import Engine
from server.requests import GenerationRequest, TokenEvent
from server.sampling import NonFiniteLogits, sample_tokens

NEW = 8
HOSTILE_LEN = 20  # the hostile prompt fills positions 0..19; normal rows never get past position 13
SAMPLED: dict[str, Any] = {"temperature": 0.9, "top_p": 0.95, "top_k": 50}


class FaultyRunner(ModelRunner):
    """The real model, with faults tied to positions (normal rows never reach them) or to batch size."""

    nan_at: int | None = None  # rows fed this position get NaN logits
    raise_at: int | None = None  # a forward feeding this position fails in its second decoder layer
    raise_batches = False  # any forward of more than one row fails in its second decoder layer
    _fail_now = False

    def forward(
        self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any, **kwargs: Any
    ) -> Any:
        hit = (positions == self.nan_at).any(-1) if self.nan_at is not None else None  # [B]
        self._fail_now = (self.raise_batches and embeds.shape[0] > 1) or (
            self.raise_at is not None and bool((positions == self.raise_at).any())
        )
        try:
            logits = super().forward(embeds, mask, positions, cache, **kwargs)  # [B, V]
        finally:
            self._fail_now = False
        if hit is not None:
            logits[hit] = float("nan")  # [B, V]
        return logits

    def fail_hook(self, module: Any, args: Any) -> None:
        if self._fail_now:
            raise RuntimeError("injected: forward failed after layer 0 wrote its cache")


class UndecodableTokenizer(IdTokenizer):
    def __init__(self, poison: int) -> None:
        self.poison = poison

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self.poison in ids:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected: cannot decode")
        return super().decode(ids, skip_special_tokens)


@pytest.fixture(scope="module")
def model() -> Any:
    return tiny_llama(seed=0)


def faulty(model: Any, tokenizer: Any = None, **faults: Any) -> FaultyRunner:
    runner = FaultyRunner.from_model(model, tokenizer or IdTokenizer(), "tiny-llama", eos_ids=frozenset())
    for name, value in faults.items():
        setattr(runner, name, value)
    model.model.layers[1]._forward_pre_hooks.clear()
    model.model.layers[1].register_forward_pre_hook(runner.fail_hook)
    return runner


def tokens_of(events: list[TokenEvent]) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


def normal_requests() -> list[Callable[[], GenerationRequest]]:
    """8 requests: greedy and seeded-sampled, bare, prompt tuning and ACCEPT (a delta on prompt tokens)."""
    tp = task("pt", "prompt_tuning", random_prompt(64, 3, seed=1))
    acc = task("acc", "accept", accept_prompt(64, 4, 3, seed=2))
    makers: list[Callable[[], GenerationRequest]] = []
    for i in range(8):
        kind = [None, tp, acc][i % 3]
        extra = {**SAMPLED, "seed": 100 + i} if i % 2 else {}
        makers.append(
            lambda i=i, kind=kind, extra=extra: request(random_ids(3 + i % 3, i), NEW, kind, **extra)
        )
    return makers


def hostile_request() -> GenerationRequest:
    return request(random_ids(HOSTILE_LEN, 99), NEW, **SAMPLED, seed=5)


def solo(model: Any, make: Callable[[], GenerationRequest]) -> list[int]:
    clean = ModelRunner.from_model(model, IdTokenizer(), "tiny-llama", eos_ids=frozenset())
    events = Engine(clean).generate_sync(make())
    assert events[-1].finish_reason == "length"
    return tokens_of(events)


def run_batch(runner: ModelRunner, hostile: GenerationRequest, during_decode: bool) -> tuple[Any, ...]:
    """8 normal requests and a hostile one: admitted in the same prefill step, or while the 8 decode."""
    engine = Engine(runner)
    normal = [_enqueue(engine, make()) for make in normal_requests()]
    if during_decode:
        engine.step()
        engine.step()
        assert engine.active == 8 and all(len(events) == 3 for events in normal)  # mid-decode
    bad = _enqueue(engine, hostile)
    while engine.active or engine.queue_depth:
        engine.step()
    return engine, normal, bad


def _enqueue(engine: Engine, req: GenerationRequest) -> list[TokenEvent]:
    events: list[TokenEvent] = []
    engine.enqueue(req, events.append)
    return events


@pytest.fixture(scope="module")
def expected(model: Any) -> list[list[int]]:
    return [solo(model, make) for make in normal_requests()]


def assert_normals_exact(normal: list[list[TokenEvent]], expected: list[list[int]]) -> None:
    for events, want in zip(normal, expected, strict=True):
        assert events[-1].finish_reason == "length", events[-1]
        assert tokens_of(events) == want


# (fault, position the hostile row feeds when it strikes): at its prefill (19) or at its 3rd decode (22)
NAN_CASES = [("nan_at", HOSTILE_LEN - 1), ("nan_at", HOSTILE_LEN + 2)]
RAISE_CASES = [("raise_at", HOSTILE_LEN - 1), ("raise_at", HOSTILE_LEN + 2)]


@pytest.mark.parametrize("during_decode", [False, True], ids=["same-prefill", "while-decoding"])
@pytest.mark.parametrize(("fault", "position"), NAN_CASES + RAISE_CASES)
def test_one_rows_fault_fails_that_row_alone(
    model: Any, expected: list[list[int]], fault: str, position: int, during_decode: bool
) -> None:
    runner = faulty(model, **{fault: position})
    engine, normal, bad = run_batch(runner, hostile_request(), during_decode)
    assert_normals_exact(normal, expected)
    assert bad[-1].finish_reason == "error"
    if fault == "nan_at":
        assert "NonFiniteLogits" in (bad[-1].error or "")
        assert engine.step_errors == 0  # a row's numbers are not a step failure
    else:
        assert "injected: forward failed" in (bad[-1].error or "")
        alone = during_decode and position < HOSTILE_LEN  # its prefill is a forward of its own
        assert engine.step_errors == (1 if alone else 2)  # the shared forward, then the hostile row alone
    assert engine.finished == {"length": 8, "error": 1}


@pytest.mark.parametrize("during_decode", [False, True], ids=["same-prefill", "while-decoding"])
def test_failed_shared_forward_is_retried_row_by_row(
    model: Any, expected: list[list[int]], during_decode: bool
) -> None:
    """Every forward of more than one row fails midway (say, out of memory above batch 1): all 9 rows are
    run alone, prefill and every decode step, and each ends with its solo tokens; nobody gets an error."""
    hostile_alone = solo(model, hostile_request)
    engine, normal, bad = run_batch(faulty(model, raise_batches=True), hostile_request(), during_decode)
    assert_normals_exact(normal, expected)
    assert bad[-1].finish_reason == "length" and tokens_of(bad) == hostile_alone
    assert engine.step_errors >= NEW - 1 and engine.finished == {"length": 9}


def test_text_decode_failure_fails_that_row_alone(model: Any, expected: list[list[int]]) -> None:
    hostile_alone = solo(model, hostile_request)
    poison = next(t for t in hostile_alone[1:] if all(t not in want for want in expected))
    runner = faulty(model, UndecodableTokenizer(poison))
    engine, normal, bad = run_batch(runner, hostile_request(), during_decode=False)
    assert_normals_exact(normal, expected)
    assert bad[-1].finish_reason == "error" and "decode failed" in (bad[-1].error or "")


def test_bad_accept_delta_fails_that_row_alone(model: Any, expected: list[list[int]]) -> None:
    wrong = SoftPrompt(embeds=torch.zeros(2, 64), added=torch.ones(3, 32), next_position=2)  # d 32, not 64
    hostile = request(random_ids(5, 98), NEW, task("bad-delta", "accept", wrong))
    runner = faulty(model)
    engine, normal, bad = run_batch(runner, hostile, during_decode=False)
    assert_normals_exact(normal, expected)
    assert bad[-1].finish_reason == "error" and "added delta has shape" in (bad[-1].error or "")


def test_sample_tokens_attributes_each_failure_to_its_row() -> None:
    from server.requests import SamplingParams

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))  # [B, V]
    logits[1, 7] = float("nan")
    logits[2] = float("-inf")
    logits[3, 9] = float("inf")
    params = [SamplingParams(temperature=0.7, seed=1)] * 4
    gens = [torch.Generator().manual_seed(1) for _ in range(4)]
    out = sample_tokens(logits, params, gens)
    ref = sample_tokens(logits[:1], params[:1], [torch.Generator().manual_seed(1)])
    assert out[0] == ref[0] and isinstance(out[0], int)
    assert all(isinstance(e, NonFiniteLogits) for e in out[1:])


def test_every_accepted_sampling_value_samples() -> None:
    """Any temperature >= 0 and top_p in (0, 1] the API accepts gives a token of the allowed set; below
    1e-5 the temperature is greedy; a top_p below the top token's probability keeps just that token."""
    from server.requests import SamplingParams
    from server.sampling import make_generator

    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(3)) * 8  # [B, V]
    logits[:, 0] = logits[:, 1]  # a tie
    for temperature in (5e-324, 1e-320, 1e-46, 1e-40, 1e-30, 9.9e-6, 1e-5, 0.5, 2.0, 5.0):
        for top_p in (5e-324, 1e-300, 1e-30, 1e-7, 0.3, 1.0):
            for top_k in (0, 1, 3):
                params = [
                    SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=s)
                    for s in range(3)
                ]
                gens = [make_generator(p, torch.device("cpu")) for p in params]
                for b, token in enumerate(sample_tokens(logits, params, gens)):
                    assert isinstance(token, int), (temperature, top_p, top_k, token)
                    if temperature < 1e-5 or top_p < 1e-6 or top_k == 1:
                        assert token == int(torch.argmax(logits[b])), (temperature, top_p, top_k)
                    elif top_k:
                        assert token in torch.topk(logits[b], top_k).indices.tolist()
