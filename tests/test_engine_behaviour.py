"""Engine behaviour: cancellation, deadlines, failures, stop strings, eos, seeded sampling, queue limits."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch
from conftest import tiny_llama
from engine_refs import IdTokenizer, random_ids, random_prompt, request, task

from runtime.model_runner import ModelRunner
from server.engine import Engine
from server.requests import GenerationRequest, TokenEvent
from server.sampling import TextStream
from server.waiting import EngineStopped, QueueFull


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner.from_model(tiny_llama(seed=0), IdTokenizer(), "tiny-llama", eos_ids=frozenset())


def tokens_of(events: list[TokenEvent]) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


def enqueue(engine: Engine, req: GenerationRequest) -> list[TokenEvent]:
    events: list[TokenEvent] = []
    engine.enqueue(req, events.append)
    return events


def test_cancel_leaves_within_one_step(runner: ModelRunner) -> None:
    engine = Engine(runner)
    a, b = request(random_ids(5, 1), 100), request(random_ids(3, 2), 100)
    ev_a, ev_b = enqueue(engine, a), enqueue(engine, b)
    for _ in range(3):
        engine.step()
    assert engine.active == 2 and len(ev_a) == 4  # step 1: prefill + decode token; then 1 each
    assert engine.cancel(a.request_id)
    engine.step()
    assert ev_a[-1].finish_reason == "cancelled" and engine.active == 1
    b.cancelled.set()  # setting the flag directly works too
    engine.step()
    assert ev_b[-1].finish_reason == "cancelled" and engine.active == 0
    assert not engine.cancel(a.request_id)  # already gone


def test_cancel_with_engine_thread(runner: ModelRunner) -> None:
    engine = Engine(runner)
    engine.start()
    try:
        first, done = threading.Event(), threading.Event()
        events: list[TokenEvent] = []

        def deliver(event: TokenEvent) -> None:
            events.append(event)
            first.set()
            if event.finish_reason:
                done.set()

        req = request(random_ids(4, 3), 400)
        engine.enqueue(req, deliver)
        assert first.wait(10)
        engine.cancel(req.request_id)
        assert done.wait(10)
        assert events[-1].finish_reason == "cancelled"
        deadline = time.monotonic() + 5
        while engine.active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.active == 0
    finally:
        engine.stop(drain_timeout=1)


def test_deadline_gives_timeout(runner: ModelRunner) -> None:
    engine = Engine(runner)
    expired = request(random_ids(4, 4), 10)
    expired.deadline = time.monotonic() - 1
    assert engine.generate_sync(expired) == [TokenEvent(None, "", finish_reason="timeout")]
    running = request(random_ids(4, 5), 100)
    events = enqueue(engine, running)
    engine.step()
    engine.step()
    running.deadline = time.monotonic() - 0.001
    engine.step()
    assert events[-1].finish_reason == "timeout" and engine.active == 0


class Flaky:
    """Wraps runner.forward; raises on the next `armed` calls (True: once)."""

    def __init__(self, runner: ModelRunner) -> None:
        self.forward = runner.forward
        self.armed: int = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.armed:
            self.armed -= 1
            raise RuntimeError("injected failure")
        return self.forward(*args, **kwargs)


def test_failed_decode_fails_only_that_batch(runner: ModelRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine(runner)
    later = request(random_ids(6, 8), 7)
    expected = tokens_of(engine.generate_sync(request(random_ids(6, 8), 7)))
    flaky = Flaky(runner)
    monkeypatch.setattr(runner, "forward", flaky)
    a, b = enqueue(engine, request(random_ids(3, 6), 20)), enqueue(engine, request(random_ids(5, 7), 20))
    engine.step()
    flaky.armed = 3  # the shared decode forward, then each row's retry alone
    engine.step()
    for events in (a, b):
        assert events[-1].finish_reason == "error" and "injected failure" in (events[-1].error or "")
    assert engine.active == 0 and engine.stats()["step_errors"] == 3
    assert tokens_of(engine.generate_sync(later)) == expected  # the engine keeps serving


def test_failed_prefill_fails_only_new_rows(runner: ModelRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine(runner)
    expected = tokens_of(engine.generate_sync(request(random_ids(4, 9), 12)))
    flaky = Flaky(runner)
    monkeypatch.setattr(runner, "forward", flaky)
    running = enqueue(engine, request(random_ids(4, 9), 12))
    engine.step()
    flaky.armed = True
    newcomer = enqueue(engine, request(random_ids(5, 10), 12))
    engine.step()
    assert newcomer[-1].finish_reason == "error" and engine.active == 1
    while engine.active:
        engine.step()
    assert running[-1].finish_reason == "length" and tokens_of(running) == expected


def test_bad_prefix_fails_only_that_request(runner: ModelRunner) -> None:
    from prompt_store import SoftPrompt

    wrong = torch.zeros(1, 1, 2, 8)  # [L, Hkv, m, Dh] of another model
    bad = task("bad", "prefix_tuning", SoftPrompt(keys=wrong, values=wrong, next_position=2))
    engine = Engine(runner)
    events = enqueue(engine, request(random_ids(3, 1), 5, bad))
    good = enqueue(engine, request(random_ids(3, 1), 5))
    while engine.active or engine.queue_depth:
        engine.step()
    assert events[-1].finish_reason == "error" and "KV prefix has shape" in (events[-1].error or "")
    assert good[-1].finish_reason == "length" and len(tokens_of(good)) == 5


def test_stop_strings_truncate_text(runner: ModelRunner) -> None:
    engine = Engine(runner)
    ids = random_ids(5, 11)
    events = engine.generate_sync(request(ids, 14))
    text = "".join(e.text for e in events)
    assert text == IdTokenizer().decode(tokens_of(events)) and len(text) == 14
    stop = text[5:7]
    cut = text.find(stop)
    stopped = engine.generate_sync(request(ids, 14, stop=("never-there", stop)))
    assert stopped[-1].finish_reason == "stop"
    assert "".join(e.text for e in stopped) == text[:cut]
    assert len(tokens_of(stopped)) == cut + len(stop)  # one character per token
    assert engine.generate_sync(request(ids, 14, stop=("zzzzzz",)))[-1].finish_reason == "length"


def test_eos_finishes_with_stop(runner: ModelRunner) -> None:
    ids = random_ids(5, 12)
    plain = tokens_of(Engine(runner).generate_sync(request(ids, 6)))
    k = next(i for i in range(1, len(plain)) if plain[i] not in plain[:i])
    with_eos = ModelRunner.from_model(runner.model, IdTokenizer(), "tiny", eos_ids=frozenset({plain[k]}))
    events = Engine(with_eos).generate_sync(request(ids, 6))
    assert tokens_of(events) == plain[:k] and events[-1] == TokenEvent(None, "", finish_reason="stop")


def test_seeded_sampling_is_reproducible(runner: ModelRunner) -> None:
    engine = Engine(runner)
    ids, sampled = random_ids(4, 13), {"temperature": 0.9, "top_p": 0.95, "top_k": 50}
    one = tokens_of(engine.generate_sync(request(ids, 12, seed=7, **sampled)))
    two = tokens_of(engine.generate_sync(request(ids, 12, seed=7, **sampled)))
    other = tokens_of(engine.generate_sync(request(ids, 12, seed=8, **sampled)))
    greedy = tokens_of(engine.generate_sync(request(ids, 12)))
    assert one == two and one != other and one != greedy
    tp = task("t", "prompt_tuning", random_prompt(64, 3, seed=1))
    neighbours = [enqueue(engine, request(random_ids(7, 14), 9, tp)), enqueue(engine, request(ids, 5))]
    batched = enqueue(engine, request(ids, 12, seed=7, **sampled))
    while engine.active or engine.queue_depth:
        engine.step()
    assert tokens_of(batched) == one and all(n[-1].finish_reason == "length" for n in neighbours)


def test_queue_full_and_stopped(runner: ModelRunner) -> None:
    """The engine holds max_batch_size + max_queue requests: free batch slots count as room to wait."""
    engine = Engine(runner, max_batch_size=2, max_queue=2)
    first = [enqueue(engine, request([5 + i], 20)) for i in range(4)]
    with pytest.raises(QueueFull):
        enqueue(engine, request([9], 1))
    engine.step()  # two rows run, two wait: the batch is full, so the room is the queue limit alone
    assert (engine.active, engine.queue_depth) == (2, 2)
    with pytest.raises(QueueFull):
        enqueue(engine, request([9], 1))
    # a waiting request whose client gave up frees its slot at once, not at the next step
    waiting = engine._inbox.requests()
    waiting[0].cancelled.set()
    late = enqueue(engine, request([10], 1))
    assert first[2][-1].finish_reason == "cancelled" and engine.queue_depth == 2
    while engine.active or engine.queue_depth:
        engine.step()
    assert [e[-1].finish_reason for e in first] == ["length", "length", "cancelled", "length"]
    assert late[-1].finish_reason == "length"
    engine.start()
    engine.stop(drain_timeout=5)
    assert not engine.is_running()
    with pytest.raises(EngineStopped):
        enqueue(engine, request([8], 1))


def test_stop_cancels_what_does_not_drain(runner: ModelRunner) -> None:
    engine = Engine(runner)
    engine.start()
    events = enqueue(engine, request(random_ids(4, 15), 450))
    engine.stop(drain_timeout=0.05)
    assert events[-1].finish_reason == "cancelled"


def test_max_batch_size_and_empty_prompt(runner: ModelRunner) -> None:
    engine = Engine(runner, max_batch_size=2)
    rows = [enqueue(engine, request(random_ids(3, i), 5)) for i in range(3)]
    empty = enqueue(engine, request([], 5))
    engine.step()
    assert engine.active == 2 and engine.queue_depth == 2 and not rows[2]
    while engine.active or engine.queue_depth:
        engine.step()
    assert all(r[-1].finish_reason == "length" for r in rows) and empty[-1].finish_reason == "error"


def test_text_stream_holds_back_partial_stops_and_bytes() -> None:
    pieces = {1: "ab", 2: "c", 3: "\ufffd", 4: "é", 5: "x"}

    def decode(ids: list[int]) -> str:  # ids 3 then 4: an incomplete character that completes later
        text = "".join(pieces[i] for i in ids)
        return text.replace("\ufffdé", "é")

    stream = TextStream(decode, stop=("cd",))
    assert stream.push(1) == ("ab", False)
    assert stream.push(2) == ("", False)  # "c" may start "cd"
    assert stream.push(3) == ("", False)  # "\ufffd" held back (and "c" still before it)
    assert stream.push(4) == ("cé", False)
    assert stream.push(5) == ("x", False)
    assert stream.flush() == ""
    stopper = TextStream(lambda ids: "xxcdyy"[: 2 * len(ids)], stop=("cd",))
    assert stopper.push(0) == ("xx", False)
    assert stopper.push(0) == ("", True)


def test_bad_prompts_fail_only_themselves(runner: ModelRunner) -> None:
    engine = Engine(runner)
    out_of_vocab = enqueue(engine, request([5, 1000], 3))
    too_long = enqueue(engine, request(list(range(3, 520)), 3))  # tiny llama: 512 positions
    good = enqueue(engine, request([5, 6], 3))
    while engine.active or engine.queue_depth:
        engine.step()
    assert "token ids must be in" in (out_of_vocab[-1].error or "")
    assert "exceeds the model context" in (too_long[-1].error or "")
    assert good[-1].finish_reason == "length" and engine.stats()["finished"] == {"error": 2, "length": 1}


def test_decode_and_delivery_failures_end_only_their_row(
    runner: ModelRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Engine(runner)
    ids = random_ids(4, 16)
    plain = tokens_of(engine.generate_sync(request(ids, 6)))
    bad_token = plain[1]
    real_decode = runner.decode
    monkeypatch.setattr(runner, "decode", lambda t: real_decode(t) if bad_token not in t else 1 / 0)
    failing = enqueue(engine, request(ids, 6))

    def broken_deliver(event: TokenEvent) -> None:
        raise ValueError("listener gone")

    deaf = request(random_ids(5, 17), 50)
    engine.enqueue(deaf, broken_deliver)
    other = enqueue(engine, request(random_ids(6, 18), 6))
    while engine.active or engine.queue_depth:
        engine.step()
    assert failing[-1].finish_reason == "error" and tokens_of(failing) == plain[:1]
    assert deaf.cancelled.is_set()
    assert other[-1].finish_reason == "length" and len(tokens_of(other)) == 6


def test_load_counts_a_request_from_enqueue_to_its_final_event(runner: ModelRunner) -> None:
    """The SIGTERM drain waits on load(): a request whose first token is out but which is not merged into
    the batch yet (it is delivered during admission) must still count as running."""
    engine = Engine(runner)
    seen: list[tuple[int, int]] = []

    def deliver(event: TokenEvent) -> None:
        if event.finish_reason is None:
            seen.append(engine.load())

    engine.enqueue(request([1, 2, 3], 3), deliver)
    assert engine.load() == (0, 1)
    engine.step()  # admission delivers token 1, then one decode step delivers token 2
    assert seen == [(1, 0), (1, 0)]
    engine.step()
    assert engine.load() == (0, 0)
