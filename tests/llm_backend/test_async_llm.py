"""The streaming API: deltas add up, concurrent streams batch, a vanished client frees KV."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading

import pytest

from covey.errors import EngineUnavailableError, InvalidRequestError
from covey.llm_backend.async_llm import AsyncLLM
from covey.llm_backend.sampling_params import SamplingParams

PARAMS = SamplingParams(max_tokens=10, ignore_eos=True)


async def collect(llm: AsyncLLM, prompt, params=PARAMS):
    outs = [out async for out in llm.generate(prompt, params)]
    return outs


async def test_stream_deltas_add_up_and_match_the_sync_engine(make_engine):
    llm = AsyncLLM(engine=make_engine())
    prompts = ["Streaming tokens is", "Batching requests is", "A paged KV cache is"]
    try:
        results = await asyncio.gather(*(collect(llm, p) for p in prompts))
    finally:
        await llm.close()
    reference = make_engine(enable_prefix_caching=False)
    for prompt, outs in zip(prompts, results):
        last = outs[-1]
        assert last.finished and sum(1 for o in outs if o.finished) == 1
        assert "".join(o.delta_text for o in outs) == last.text
        assert [t for o in outs for t in o.delta_token_ids] == last.token_ids
        assert last.metrics.ttft is not None and last.metrics.tpot is not None
        reference.add_request(prompt, PARAMS, request_id=prompt)
    sync = {out.request_id: out.token_ids for out in reference.run_to_completion(prompts)}
    assert all(sync[p] == outs[-1].token_ids for p, outs in zip(prompts, results))


async def test_client_that_goes_away_aborts_and_frees_kv(make_engine):
    engine = make_engine(enable_prefix_caching=False)
    llm = AsyncLLM(engine=engine)
    stream = llm.generate("Tell me everything about paging.", SamplingParams(max_tokens=200))
    async for _ in stream:
        break
    await stream.aclose()
    for _ in range(50):
        if not engine.requests:
            break
        await asyncio.sleep(0.05)
    assert not engine.requests
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    await llm.close()


async def test_bad_request_raises_before_any_output(make_engine):
    llm = AsyncLLM(engine=make_engine())
    with pytest.raises(InvalidRequestError, match="the prompt is empty"):
        await collect(llm, "")
    out = await llm.generate_full("Still serving after a bad request:", PARAMS)
    assert out.finished and len(out.token_ids) == 10
    await llm.close()


async def test_chat_uses_the_chat_template(make_engine):
    llm = AsyncLLM(engine=make_engine())
    outs = [
        o
        async for o in llm.chat(
            [{"role": "user", "content": "Say hi"}], SamplingParams(max_tokens=8)
        )
    ]
    assert outs[-1].finished and outs[-1].text
    with pytest.raises(InvalidRequestError, match="chat messages must not be empty"):
        llm.chat([])
    await llm.close()


async def test_abort_ends_the_stream_with_an_abort_output(make_engine):
    engine = make_engine(enable_prefix_caching=False)
    llm = AsyncLLM(engine=engine)
    outs = []
    async for out in llm.generate("Count slowly:", SamplingParams(max_tokens=200), request_id="r"):
        outs.append(out)
        if len(outs) == 2:
            await llm.abort("r")
    assert outs[-1].finished and outs[-1].finish_reason == "abort"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    await llm.close()


def test_one_async_llm_serves_one_event_loop_after_another(make_engine, caplog):
    """`asyncio.run` twice: the step loop and its wake event move to the new loop."""
    llm = AsyncLLM(engine=make_engine())

    async def one():
        return await asyncio.wait_for(llm.generate_full("Event loops are", PARAMS), 120)

    with caplog.at_level(logging.WARNING):
        first = asyncio.run(one())
        second = asyncio.run(one())
        asyncio.run(llm.close())
        gc.collect()  # a task that died unretrieved logs when it is collected
    assert len(first.token_ids) == 10 and second.token_ids == first.token_ids
    assert "different event loop" not in caplog.text
    assert "never retrieved" not in caplog.text


async def test_a_running_engine_call_reports_its_age_and_none_after(make_engine):
    """A step that never returns must be visible from the loop: the call now running on the
    worker thread has an age that grows, and is gone once the call returns."""
    llm = AsyncLLM(engine=make_engine(), worker_thread=True)
    release = threading.Event()
    try:
        assert llm.engine_call_s() == 0.0
        hung = asyncio.ensure_future(llm._call(release.wait, 30))  # a hung disk read
        await asyncio.sleep(0.3)
        first = llm.engine_call_s()
        await asyncio.sleep(0.2)
        assert 0.2 < first < llm.engine_call_s()
        release.set()
        assert await hung is True
        assert llm.engine_call_s() == 0.0
        out = await llm.generate_full("Still stepping after it:", SamplingParams(max_tokens=2))
        assert out.finished and llm.engine_call_s() == 0.0
    finally:
        release.set()
        await llm.close()


async def test_a_step_loop_that_died_is_reported(make_engine):
    llm = AsyncLLM(engine=make_engine(), worker_thread=True)
    broken = RuntimeError("scheduler bug")

    def has_unfinished_requests() -> bool:  # outside the step's own try: kills the loop
        raise broken

    llm.engine.has_unfinished_requests = has_unfinished_requests
    stream = llm.generate("Nobody steps this:", SamplingParams(max_tokens=2))
    waiting = asyncio.ensure_future(anext(stream))
    for _ in range(100):
        if llm.step_loop_error() is not None:
            break
        await asyncio.sleep(0.02)
    assert llm.step_loop_error() is broken and not waiting.done()
    waiting.cancel()
    await llm.close()
    assert llm.closed


async def test_a_call_after_close_gets_a_covey_error_not_the_executor_s(make_engine):
    llm = AsyncLLM(engine=make_engine(), worker_thread=True)
    assert (await llm.stats()).num_running == 0
    await llm.close()
    with pytest.raises(EngineUnavailableError, match="the engine is closed"):
        await llm.stats()
