"""The runtime reaches engines only through `EngineClient`: the real engine and the test
double both implement it, and the runtime acts on the capabilities an engine declares."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

import covey.graph as cg
from covey.errors import ConfigError, NotSupportedError
from covey.llm_backend.async_llm import AsyncLLM
from covey.llm_backend.engine_client import ChatTokenizer, EngineClient
from covey.llm_backend.sampling_params import SamplingParams
from covey.runtime import Runtime
from tests.graph import shapes

from .fakes import FakeLLM


def test_the_engine_and_its_test_double_are_engine_clients(real_llm):
    assert isinstance(real_llm, AsyncLLM)
    for llm in (real_llm, FakeLLM()):
        assert isinstance(llm, EngineClient)
        assert isinstance(llm.tokenizer, ChatTokenizer)
    assert real_llm.capabilities.computes_on_loop_thread  # a CPU engine steps on the loop


def test_a_runtime_refuses_what_is_not_an_engine_client():
    class HalfEngine:
        async def generate(self, prompt, params=None, request_id=None, priority=0):
            yield None

    with pytest.raises(ConfigError, match="Runtime needs an EngineClient.*got HalfEngine"):
        Runtime(HalfEngine())  # type: ignore[arg-type]


async def test_choices_on_an_engine_without_them_are_refused_naming_the_node():
    llm = FakeLLM(capabilities=replace(FakeLLM().capabilities, choices=False))
    with pytest.raises(NotSupportedError, match=r"node 'judge': its gen has choices"):
        await Runtime(llm).run(shapes.merge(), question="q")
    assert llm.log == []  # refused before anything ran


async def test_the_double_does_what_it_declares_and_refuses_the_rest():
    llm = FakeLLM(reply=lambda p: "a b c d", token_delay=0.01)
    with pytest.raises(NotSupportedError, match="'pause'"):
        await llm.pause("x")
    with pytest.raises(NotSupportedError, match="'prefill'"):
        await llm.prefill("text")
    stream = llm.generate("hi", SamplingParams(max_tokens=8), request_id="r")
    first = await anext(stream)
    assert (await llm.stats()).num_running == 1 and first.text == "a"
    await llm.abort("r")
    rest = [out async for out in stream]
    assert rest[-1].finished and rest[-1].finish_reason == "abort" and llm.aborted == ["r"]
    assert (await llm.stats()).num_running == 0

    able = FakeLLM(capabilities=replace(llm.capabilities, pause=True), token_delay=0.01)
    stream = able.generate("hi", SamplingParams(max_tokens=8), request_id="p")
    await anext(stream)
    await able.pause("p")
    assert (await able.stats()).num_paused == 1
    waiting = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await able.resume("p", " tool result")
    assert (await waiting).text == "alpha beta" and able.resumed == [("p", " tool result", None)]
    await stream.aclose()


async def test_an_engine_without_segments_gets_plain_text_prompts():
    """A remote backend takes strings: a plain template's segments are sent joined, and a
    later gen sees the earlier one's text, not its token ids."""

    @cg.semantic_function
    def two(topic: str):
        """Topic: {{topic}}
        A: {{gen first max_tokens=2}}
        B: {{gen second max_tokens=2}}"""

    @cg.app
    def app(topic: str):
        return two(topic=topic)

    llm = FakeLLM(capabilities=replace(FakeLLM().capabilities, segments=False))
    out = await Runtime(llm).run(app, topic="owls")
    prompts = list(llm.prompts.values())
    assert prompts == ["Topic: owls\nA: ", "Topic: owls\nA: alpha beta\nB: "]
    assert out == {"first": "alpha beta", "second": "alpha beta"}


async def test_prefill_ahead_sends_plain_text_to_an_engine_without_segments():
    """A call waiting on another has its known start prefilled ahead: as text, when the
    engine takes no segments (it would refuse a Segment list)."""
    caps = replace(FakeLLM().capabilities, prefill=True, segments=False)
    llm = FakeLLM(capabilities=caps)

    @cg.semantic_function
    def first(topic: str):
        """About {{topic}}: {{gen a max_tokens=2}}"""

    @cg.semantic_function
    def second(topic: str, a: str):
        """Long instructions for the second call on {{topic}}, then {{a}}: {{gen b max_tokens=2}}"""

    @cg.app
    def app(topic: str):
        return second(topic=topic, a=first(topic=topic))

    await Runtime(llm).run(app, topic="owls")
    assert llm.prefills, "the waiting call's known start was prefilled ahead"
    assert all(isinstance(prompt, str) for prompt, _ in llm.prefills)
    expected = "Long instructions for the second call on owls"
    assert any(prompt.startswith(expected) for prompt, _ in llm.prefills)
