"""One bad request fails alone: refused at the edge, or finished with "error" in a step,
while the requests beside it finish exactly as they would have alone."""

from __future__ import annotations

import asyncio
import math
import random

import numpy as np
import pytest

from covey.errors import EngineError, InvalidRequestError
from covey.llm_backend import sampler
from covey.llm_backend.async_llm import AsyncLLM
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.segments import Segment

HEALTHY = ["The three primary colors are", "Python is a programming language that"]
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)
VOCAB = 49152

BAD_FIELDS = {
    "temperature": [math.nan, math.inf, -math.inf, 1e-45, "0.5", True, None, -0.1, 1e308],
    "top_p": [math.nan, 0.0, 1.5, "1", -1, 5e-324],
    "top_k": [1.5, -1, "x", 10**30, np.int64(3)],
    "seed": ["abc", np.int64(3), 2**70, -1, 1.5, [1]],
    "max_tokens": [0, -5, 1.5, np.int64(3), 10**9, "8"],
    "stop": [[1], [""], 5, ["\ud800"], [None]],
    "stop_token_ids": [[-1], [10**9], ["a"], [VOCAB], [VOCAB - 1]],
    "choices": [[""], "ab", [1, 2], ["\ud800", "b"]],
}
BAD_PROMPTS = [
    "",
    "\ud800",
    "ok \udfff then",
    [-1],
    [VOCAB],
    [10**12],
    [1.5],
    [True],
    b"bytes",
    None,
    123,
    lambda: [Segment(token_ids=[-1])],
    lambda: [Segment(token_ids=[VOCAB])],
    lambda: [Segment(text="\ud800")],
    lambda: [Segment(text="fine"), Segment(token_ids=[2**40])],
]
BAD_PRIORITIES = ["x", None, 1.5, [0]]


def bad_submission(rng: random.Random):
    """A (prompt, params-or-factory, priority) with one bad or borderline value."""
    kind = rng.choice(["field", "field", "prompt", "priority"])
    if kind == "field":
        name = rng.choice(sorted(BAD_FIELDS))
        fields = {"max_tokens": 6, name: rng.choice(BAD_FIELDS[name])}
        return "Say something:", lambda: SamplingParams(**fields), 0
    if kind == "prompt":
        return rng.choice(BAD_PROMPTS), lambda: SamplingParams(max_tokens=6), 0
    return "Say something:", lambda: SamplingParams(max_tokens=6), rng.choice(BAD_PRIORITIES)


def add_healthy(engine, prefix: str) -> list[str]:
    """Queue every HEALTHY prompt, greedy, as `{prefix}{i}`."""
    return [engine.add_request(p, GREEDY, request_id=f"{prefix}{i}") for i, p in enumerate(HEALTHY)]


def drain(engine, request_ids: list[str]) -> dict:
    """Step until nothing is left; the final outputs of `request_ids`, by id."""
    return dict(zip(request_ids, engine.run_to_completion(request_ids)))


def test_fuzzed_bad_requests_never_touch_the_healthy_ones(make_engine):
    engine = make_engine(kv_cache_tokens=1024)
    alone = {}
    for i, prompt in enumerate(HEALTHY):
        alone |= drain(engine, [engine.add_request(prompt, GREEDY, request_id=f"alone{i}")])
    rng = random.Random(1234)
    refused = accepted = 0
    for round_ in range(12):
        healthy = add_healthy(engine, f"h{round_}.")
        engine.step()  # the healthy ones are mid-flight when the bad ones arrive
        bad_ids = []
        for k in range(3):
            prompt, params, priority = bad_submission(rng)
            rid = f"bad{round_}.{k}"
            try:
                if callable(prompt):
                    prompt = prompt()
                engine.add_request(prompt, params(), request_id=rid, priority=priority)
            except InvalidRequestError:
                refused += 1
                assert rid not in engine.requests
                continue
            accepted += 1
            bad_ids.append(rid)
            engine.step()
        finals = drain(engine, healthy + bad_ids)
        for i in range(len(HEALTHY)):
            out = finals[f"h{round_}.{i}"]
            assert out.finish_reason == "length" and out.error is None
            assert out.token_ids == alone[f"alone{i}"].token_ids
        for rid in bad_ids:  # borderline values that are fine (1e-45, numpy ints) just run
            assert finals[rid].finished
            assert (finals[rid].finish_reason == "error") == (finals[rid].error is not None)
    assert refused >= 25 and accepted >= 2
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def run_with_one_bad(engine, bad_params=GREEDY) -> dict:
    ids = add_healthy(engine, "h")
    ids.append(engine.add_request("This one will fail:", bad_params, request_id="bad"))
    return drain(engine, ids)


def assert_only_bad_failed(engine, finals: dict, reference: dict, message: str) -> None:
    bad = finals["bad"]
    assert bad.finished and bad.finish_reason == "error" and message in bad.error
    for i in range(len(HEALTHY)):
        assert finals[f"h{i}"].token_ids == reference[f"h{i}"].token_ids
        assert finals[f"h{i}"].error is None
    assert not engine.requests
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.fixture
def reference(make_engine) -> dict:
    engine = make_engine(enable_prefix_caching=False)
    return drain(engine, add_healthy(engine, "h"))


def test_a_failing_forward_pass_fails_only_its_request(make_engine, reference):
    engine = make_engine()
    execute = engine.runner.execute
    calls = []

    def flaky(scheduled, copies):
        calls.append(len(scheduled))
        if any(item.seq.request_id == "bad" for item in scheduled):
            raise RuntimeError("index out of range in self")
        return execute(scheduled, copies)

    engine.runner.execute = flaky
    finals = run_with_one_bad(engine)
    assert_only_bad_failed(engine, finals, reference, "RuntimeError: index out of range")
    assert calls[:4] == [3, 1, 1, 1]  # the batch, then each request alone


def test_a_failing_sampler_row_fails_only_its_request(make_engine, reference, monkeypatch):
    real = sampler._sample_row

    def flaky(logits, p, gen):
        if p.seed == 13:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, p, gen)

    monkeypatch.setattr(sampler, "_sample_row", flaky)
    engine = make_engine()
    finals = run_with_one_bad(engine, SamplingParams(max_tokens=8, temperature=0.7, seed=13))
    assert_only_bad_failed(engine, finals, reference, "probability tensor")


def test_a_failing_output_fails_only_its_request(make_engine, reference, monkeypatch):
    engine = make_engine()
    append = engine.outputs.append_token

    def flaky(seq, token):
        if seq.request_id == "bad" and seq.num_output_tokens >= 2:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return append(seq, token)

    monkeypatch.setattr(engine.outputs, "append_token", flaky)
    finals = run_with_one_bad(engine)
    assert_only_bad_failed(engine, finals, reference, "invalid start byte")


async def test_async_streams_see_an_engine_error_only_on_the_failed_request(make_engine, reference):
    engine = make_engine()
    execute = engine.runner.execute

    def flaky(scheduled, copies):
        if any(item.seq.request_id == "bad" for item in scheduled):
            raise RuntimeError("device-side assert")
        return execute(scheduled, copies)

    engine.runner.execute = flaky
    llm = AsyncLLM(engine=engine)

    async def final(prompt, rid):
        outs = [o async for o in llm.generate(prompt, GREEDY, request_id=rid)]
        return outs[-1]

    try:
        results = await asyncio.gather(
            final(HEALTHY[0], "h0"),
            final("This one will fail:", "bad"),
            final(HEALTHY[1], "h1"),
            return_exceptions=True,
        )
    finally:
        await llm.close()
    assert isinstance(results[1], EngineError) and "device-side assert" in str(results[1])
    assert results[0].token_ids == reference["h0"].token_ids
    assert results[2].token_ids == reference["h1"].token_ids
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_request_that_outgrows_the_pool_fails_alone_instead_of_hanging(
    make_engine, reference, monkeypatch
):
    """A request whose KV outgrows the whole pool (4 blocks) while it decodes, the
    validator's pool check turned off as by any fault that would let one through. Alone in
    the pool it used to preempt itself, recompute its prompt chunk by chunk and run short at
    the same token, every step: never finished, never failed. Now it fails with its reason
    and the others finish as they would alone. No real input reaches this path: the
    validator refuses a prompt and max_tokens (and forks) beyond the pool up front, so the
    scheduler's check is defence in depth, tested here with that check off."""
    engine = make_engine(
        kv_cache_tokens=64, block_size=16, enable_prefix_caching=False, max_num_batched_tokens=32
    )
    monkeypatch.setattr(engine.validator, "check_pool", lambda needed, what: None)
    ids = add_healthy(engine, "h")
    long = SamplingParams(max_tokens=80, ignore_eos=True)
    ids.append(engine.add_request("This one will fail:", long, request_id="bad"))
    finals = {}
    for _ in range(150):  # it fails at about step 60; a hang would run on
        if not engine.has_unfinished_requests():
            break
        finals.update((out.request_id, out) for out in engine.step() if out.finished)
    assert set(finals) == set(ids), "the engine never finished every request"
    assert_only_bad_failed(engine, finals, reference, "InvalidRequestError: request 'bad' cannot")
    assert "the pool has 4 blocks" in finals["bad"].error
