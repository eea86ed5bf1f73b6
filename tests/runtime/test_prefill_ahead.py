"""The runtime acts on the plan: pinned static prefixes, early prefill while upstream nodes
run, and the naive baseline (`optimize=False`) that runs one call at a time."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import covey.graph as cg
from covey.llm_backend.async_llm import AsyncLLM
from covey.llm_backend.sampling_params import SamplingParams
from covey.runtime import Runtime
from tests.graph import shapes

from .conftest import make_cpu_engine
from .fakes import FakeLLM

GREEDY = SamplingParams(max_tokens=6, temperature=0.0)


@cg.function
async def slow_notes(question: str) -> str:
    await asyncio.sleep(0.3)  # stands in for retrieval: the answer's prefix is known before
    return "Notes: the city has a river and an old bridge."


@cg.semantic_function(params=GREEDY)
def answer(question: str, notes: str):
    """{{#system}}
    You answer questions about cities. Be brief, be accurate, name one place only. You
    never guess: when the notes do not say, you answer with what is widely known. You keep
    to one short sentence and you do not repeat the question back to the user.
    {{#user}}
    Question: {{question}}
    {{notes}}
    {{#assistant}}
    {{gen text}}"""


@cg.app
def city_qa(question: str):
    return answer(question=question, notes=slow_notes(question=question))


async def _run(runtime: Runtime, question: str):
    return await runtime.run_traced(city_qa, question=question)


async def test_static_prefix_is_pinned_and_the_early_prefix_prefilled_during_upstream_work():
    llm = AsyncLLM(engine=make_cpu_engine())
    try:
        runtime = Runtime(llm)
        first = await _run(runtime, "Which river flows through Prague?")
        kinds = sorted(p.var.split(":")[0] for p in first.trace.prefills)
        assert kinds == ["city_qa", "early"], first.trace.prefills
        pinned = await llm.pinned()
        assert len(pinned) == 1 and next(iter(pinned.values())) >= 32
        (req,) = first.trace.nodes["answer"].requests
        early = next(p for p in first.trace.prefills if p.var == "early")
        assert req.cached_tokens >= early.prompt_tokens - 16  # found the early prefill

        second = await _run(runtime, "Which river flows through Vienna?")
        assert all(p.var == "early" for p in second.trace.prefills)  # pinned once per app
        (req,) = second.trace.nodes["answer"].requests
        assert req.cached_tokens >= next(iter(pinned.values()))

        naive_llm = AsyncLLM(engine=make_cpu_engine(enable_prefix_caching=False))
        try:
            naive_runtime = Runtime(naive_llm, optimize=False)
            naive = await _run(naive_runtime, "Which river flows through Vienna?")
        finally:
            await naive_llm.close()
        assert naive.outputs == second.outputs
        assert naive.trace.prefills == []
        await runtime.unpin_all()
        assert await llm.pinned() == {}
    finally:
        await llm.close()


async def test_naive_runtime_runs_one_node_at_a_time_with_the_same_outputs():
    app = shapes.branch()
    fast = await Runtime(FakeLLM()).run_traced(app, question="q")
    naive = await Runtime(FakeLLM(), optimize=False).run_traced(app, question="q")
    assert fast.outputs == naive.outputs
    assert fast.trace.overlapped("argue_for", "argue_against")
    assert not naive.trace.overlapped("argue_for", "argue_against")
    naive_plan = Runtime(FakeLLM(), optimize=False).plan_for(app)
    assert all(n.priority == 0 for n in naive_plan.nodes.values())
    assert not any(p.pin for n in naive_plan.nodes.values() for p in n.primitives)


async def test_prefill_ahead_follows_the_engines_prefill_capability():
    without = FakeLLM()
    assert not without.capabilities.prefill
    result = await Runtime(without).run_traced(city_qa, question="Prague?")
    assert result.trace.prefills == [] and without.prefills == []

    able = FakeLLM(capabilities=replace(without.capabilities, prefill=True))
    runtime = Runtime(able)
    result = await runtime.run_traced(city_qa, question="Prague?")
    pins = [pin for _, pin in able.prefills if pin is not None]
    assert len(pins) == 1 and runtime.pins == set(pins) == set(await able.pinned())
    assert sorted(p.var for p in result.trace.prefills) == sorted([pins[0], "early"])
    await runtime.unpin_all()
    assert await able.pinned() == {} and runtime.pins == set()


async def test_a_pin_the_engine_released_is_pinned_again_by_the_next_run():
    """Pins yield when requests need the room: the next run asks for the pin again."""
    llm = FakeLLM(capabilities=replace(FakeLLM().capabilities, prefill=True))
    runtime = Runtime(llm)
    await runtime.run(city_qa, question="Prague?")
    (pin,) = runtime.pins
    llm.pins.clear()  # the engine released it to admit a request
    await runtime.run(city_qa, question="Vienna?")
    assert set(await llm.pinned()) == {pin} and runtime.pins == {pin}


@cg.function
def fast_notes(question: str) -> str:
    return "Background: " + " ".join(["Rivers shape the cities built along them."] * 8)


@cg.function
async def slow_detail(question: str) -> str:
    await asyncio.sleep(0.4)
    return "Detail: the old bridge is made of stone."


@cg.semantic_function(params=GREEDY)
def answer_from(background: str, detail: str, question: str):
    """{{#user}}
    {{background}}
    {{detail}}
    Question: {{question}}
    {{#assistant}}
    {{gen text}}"""


@cg.app
def staged_qa(question: str):
    return answer_from(
        background=fast_notes(question=question),
        detail=slow_detail(question=question),
        question=question,
    )


async def test_a_prefix_known_from_a_finished_upstream_node_is_prefilled_while_others_run():
    llm = AsyncLLM(engine=make_cpu_engine())
    try:
        result = await Runtime(llm).run_traced(staged_qa, question="Why visit Prague?")
    finally:
        await llm.close()
    (early,) = [p for p in result.trace.prefills if p.var == "early"]
    assert early.prompt_tokens >= 64  # the background paragraph, known before the detail
    assert early.generated_tokens == 0 and early.ttft is not None  # a prefill outputs none
    (req,) = result.trace.nodes["answer_from"].requests
    assert req.cached_tokens >= early.prompt_tokens - 16
