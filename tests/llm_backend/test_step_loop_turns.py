"""Between two steps the step loop lets work that arrived meanwhile through: a request
handed over in a few loop turns joins the very next step, instead of losing a step per
turn (on CPU a step blocks the event loop)."""

from __future__ import annotations

import asyncio

import pytest

from covey.llm_backend import async_llm
from covey.llm_backend.async_llm import AsyncLLM
from covey.llm_backend.sampling_params import SamplingParams

HAND_OFF_TURNS = 3  # a server's hand-off to the engine's loop, as Ray Serve's takes


async def steps_until_joined(llm: AsyncLLM) -> int:
    """Steps between a request handed over (while another request decodes) and the first
    step that runs it."""
    engine = llm.engine
    steps: list[set[str]] = []  # the requests each step started with
    step = engine.step

    def counted():
        steps.append(set(engine.requests))
        return step()

    engine.step = counted
    long = asyncio.ensure_future(
        _drain(llm.generate("Tell me a long story.", SamplingParams(max_tokens=24,
                                                                    ignore_eos=True)))
    )
    while len(steps) < 3:  # it decodes
        await asyncio.sleep(0)
    handed_at = len(steps)

    async def handed_over() -> None:
        for _ in range(HAND_OFF_TURNS):
            await asyncio.sleep(0)
        await _drain(llm.generate("Hi", SamplingParams(max_tokens=1), request_id="late"))

    await handed_over()
    await long
    return next(i for i, rids in enumerate(steps) if "late" in rids) - handed_at


async def _drain(stream) -> None:
    async for _ in stream:
        pass


async def test_a_request_handed_over_during_a_step_joins_the_next_one(make_engine):
    llm = AsyncLLM(engine=make_engine())
    try:
        assert await steps_until_joined(llm) == 0
    finally:
        await llm.close()


async def test_one_turn_between_steps_loses_a_step_per_hop(make_engine, monkeypatch, device):
    """The measurement above can fail: with the old single turn the request joins later."""
    if device != "cpu":
        pytest.skip("on CUDA steps run on a worker thread: the loop is free during a step")
    monkeypatch.setattr(async_llm, "TURNS_BETWEEN_STEPS", 1)
    llm = AsyncLLM(engine=make_engine())
    try:
        assert await steps_until_joined(llm) >= HAND_OFF_TURNS
    finally:
        await llm.close()
