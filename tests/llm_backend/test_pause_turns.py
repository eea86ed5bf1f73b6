"""Turns that pause for a tool instead of finishing (pause_on_stop, pause_at_end) on the real
embedded model: the stop text stays in the context, the stream stays open across resume,
and abort frees a paused request."""

from __future__ import annotations

import asyncio

import pytest

from covey.errors import InvalidRequestError
from covey.llm_backend.async_llm import AsyncLLM
from covey.llm_backend.sampling_params import SamplingParams

PROMPT = "The calculator says that twelve times twelve is"


def _greedy(engine, prompt, max_tokens):
    rid = engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    return engine.run_to_completion([rid])[0]


def test_a_stop_token_pauses_the_turn_and_stays_in_the_context(make_engine):
    engine = make_engine()
    free = _greedy(engine, PROMPT, 6)
    stop = free.token_ids[2]
    params = SamplingParams(
        max_tokens=6, ignore_eos=True, stop_token_ids=[stop], pause_on_stop=True
    )
    rid = engine.add_request(PROMPT, params)
    (out,) = engine.run_to_completion([rid])
    assert not out.finished and out.finish_reason == "paused"
    assert out.token_ids == free.token_ids[: free.token_ids.index(stop) + 1]
    assert rid in engine.scheduler.paused
    seq = engine.requests[rid]
    assert seq.token_ids[-1] == stop  # the stop token is context for the next turn
    turn = SamplingParams(max_tokens=5, ignore_eos=True)
    engine.resume_request(rid, " (tool: 144).", turn)
    (resumed,) = engine.run_to_completion([rid])
    assert resumed.finished and resumed.finish_reason == "length"
    fresh = make_engine(enable_prefix_caching=False)
    ctx = seq.token_ids[: seq.num_prompt_tokens]
    again = fresh.run_to_completion([fresh.add_request(ctx, turn)])[0]
    assert resumed.token_ids == again.token_ids
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_a_stop_string_pauses_with_its_text_released(make_engine):
    engine = make_engine()
    free = _greedy(engine, PROMPT, 8)
    word = "."
    assert word in free.text  # " 120." (SmolLM2 is not a calculator)
    params = SamplingParams(max_tokens=8, ignore_eos=True, stop=[word], pause_on_stop=True)
    (out,) = engine.run_to_completion([engine.add_request(PROMPT, params)])
    assert out.finish_reason == "paused" and not out.finished
    assert out.text == free.text[: free.text.index(word)]
    seq = engine.requests[out.request_id]
    assert word in engine.tokenizer.decode(seq.output_token_ids)  # in the context
    engine.abort_request(out.request_id)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_pause_on_stop_finishes_on_length_and_pause_at_end_pauses_on_it(make_engine):
    engine = make_engine()
    on_stop = SamplingParams(max_tokens=3, ignore_eos=True, stop=["@@@"], pause_on_stop=True)
    at_end = SamplingParams(max_tokens=3, ignore_eos=True, pause_at_end=True)
    a, b = engine.run_to_completion(
        [engine.add_request(PROMPT, on_stop), engine.add_request(PROMPT, at_end)]
    )
    assert a.finished and a.finish_reason == "length"
    assert not b.finished and b.finish_reason == "paused" and len(b.token_ids) == 3
    engine.pause_request(b.request_id, tool="calculator")
    assert engine.requests[b.request_id].pause_tool == "calculator"
    with pytest.raises(InvalidRequestError, match="tool must be a non-empty str"):
        engine.pause_request(b.request_id, tool="")
    engine.abort_request(b.request_id)


def test_pause_flags_are_checked():
    with pytest.raises(InvalidRequestError, match="pause_at_end must be True or False"):
        SamplingParams(pause_at_end="yes")


def test_the_stream_stays_open_across_a_paused_turn(make_engine):
    engine = make_engine()
    llm = AsyncLLM(engine=engine)
    first = SamplingParams(max_tokens=3, ignore_eos=True, pause_at_end=True)
    second = SamplingParams(max_tokens=4, ignore_eos=True)

    async def main():
        outs = []
        async for out in llm.generate(PROMPT, first, request_id="t"):
            outs.append(out)
            if out.finish_reason == "paused":
                await llm.pause("t", tool="calculator")
                await llm.resume("t", " 144. So", second)
        await llm.close()
        return outs

    outs = asyncio.run(main())
    reasons = [o.finish_reason for o in outs]
    assert reasons.count("paused") == 1 and reasons[-1] == "length" and outs[-1].finished
    assert len(outs[-1].token_ids) == 4
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_consumer_that_leaves_while_paused_frees_everything(make_engine):
    engine = make_engine()
    llm = AsyncLLM(engine=engine)
    params = SamplingParams(max_tokens=3, ignore_eos=True, pause_at_end=True)

    async def main():
        stream = llm.generate(PROMPT, params, request_id="gone")
        async for out in stream:
            if out.finish_reason == "paused":
                break
        await stream.aclose()
        await llm.close()

    asyncio.run(main())
    assert not engine.requests and not engine.scheduler.paused
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
