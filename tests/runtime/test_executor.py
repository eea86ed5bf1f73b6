"""The executor on a fake engine: concurrency, dependency order, failures, timeouts, trace."""

from __future__ import annotations

import asyncio
import threading

import pytest

import covey.graph as cg
from covey.errors import (
    AppTimeoutError,
    ConfigError,
    InvalidRequestError,
    NodeExecutionError,
    RetrieverNotBoundError,
)
from covey.retrieval.documents import Chunk, SearchResult
from covey.retrieval.searcher import DEFAULT_K, DEFAULT_MODE
from covey.runtime import Runtime
from covey.runtime.render import to_text
from tests.graph import shapes

from .fakes import FakeLLM


class FakeIndex:
    """A `Searcher` with DocumentIndex's defaults; records each query and the k and mode it
    searched with."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str]] = []

    def search(self, query, k=None, mode=None, sources=None) -> list[SearchResult]:
        k, mode = k or DEFAULT_K, mode or DEFAULT_MODE
        self.calls.append((query, k, mode))
        return [
            SearchResult(Chunk(f"c{i}", f"chunk text {i}", "doc", 0, 12, 3), 1.0 / (i + 1))
            for i in range(k)
        ]


async def test_siblings_reach_the_engine_before_either_finishes():
    llm = FakeLLM(reply=lambda p: "for" if "Argue for" in p else "against")
    result = await Runtime(llm).run_traced(shapes.branch(), question="Cats?")
    assert result.outputs == {"pro": "for", "con": "against"}
    submits = llm.times("submit", "argue_for.argument") + llm.times(
        "submit", "argue_against.argument"
    )
    finishes = llm.times("finish", "argue_for.argument") + llm.times(
        "finish", "argue_against.argument"
    )
    assert len(submits) == 2 and max(submits) < min(finishes)
    assert result.trace.overlapped("argue_for", "argue_against")


async def test_nodes_wait_for_their_producers_and_retrieval_is_bound_by_name():
    llm = FakeLLM(reply=lambda p: "cats facts" if "rewrite" in p else "final answer")
    index = FakeIndex()
    runtime = Runtime(llm)
    runtime.bind_retriever("default", index)
    result = await runtime.run_traced(shapes.linear(), question="Tell me about cats")
    assert result.outputs == {"answer": "final answer"}
    assert index.calls == [("cats facts", 3, "hybrid")]
    t = result.trace.nodes
    assert t["rewrite"].end <= t["retrieve"].start and t["retrieve"].end <= t["answer"].start
    (answer_prompt,) = [p for rid, p in llm.prompts.items() if ":answer.answer" in rid]
    text = to_text(answer_prompt)
    assert "chunk text 0\n\nchunk text 1\n\nchunk text 2" in text
    assert text.endswith("</user><assistant>")
    chunks = [s.chunk_id for s in answer_prompt if s.kind == "chunk"]
    assert chunks == ["c0", "c1", "c2"]


async def test_sync_tools_run_in_a_thread_and_async_functions_are_awaited():
    seen: dict[str, int] = {}

    @cg.tool
    def lookup(query: str) -> list[str]:
        seen["tool"] = threading.get_ident()
        return [query, "more"]

    @cg.function
    async def bullet(facts: list[str]) -> str:
        seen["function"] = threading.get_ident()
        return "; ".join(facts)

    @cg.app
    def agent(question: str) -> str:
        return shapes.reply(question, bullet(lookup(shapes.rewrite(question))))

    llm = FakeLLM(reply=lambda p: "q1" if "rewrite" in p else "done")
    assert await Runtime(llm).run(agent, question="why?") == {"reply": "done"}
    assert seen["tool"] != threading.get_ident() and seen["function"] == threading.get_ident()
    (reply_prompt,) = [p for rid, p in llm.prompts.items() if ":reply.reply" in rid]
    assert "Facts:\nq1; more" in reply_prompt


async def test_map_fans_out_with_chunk_segments_and_keeps_element_order():
    llm = FakeLLM(reply=lambda p: "note" if "Summary" in "".join(s.text or "" for s in p) else "x")
    runtime = Runtime(llm, retrievers={"default": FakeIndex()})
    result = await runtime.run_traced(shapes.map_reduce(), question="q")
    assert result.outputs == {"answer": "x"}
    element_prompts = [p for rid, p in llm.prompts.items() if ":map_summarize.summary" in rid]
    assert len(element_prompts) == 8
    chunks = {s.chunk_id for p in element_prompts for s in p if s.kind == "chunk"}
    assert chunks == {f"c{i}" for i in range(8)}
    (combine_prompt,) = [p for rid, p in llm.prompts.items() if ":combine.answer" in rid]
    assert "\n".join(["note"] * 8) in "".join(s.text or "" for s in combine_prompt)
    assert result.trace.nodes["map_summarize"].generated_tokens == 8


async def test_second_gen_continues_from_the_first_ones_tokens():
    @cg.semantic_function
    def two(topic: str):
        """Topic: {{topic}}
        Name: {{gen name max_tokens=4}}
        Reason: {{gen reason max_tokens=4}}"""

    @cg.app
    def both(topic: str):
        return two(topic)

    llm = FakeLLM(reply=lambda p: "one two")
    out = await Runtime(llm).run(both, topic="owls")
    assert out == {"name": "one two", "reason": "one two"}
    first, second = (p for rid, p in llm.prompts.items())
    assert second[: len(first)] == first
    assert second[len(first)].token_ids == (0, 1) and second[len(first)].kind == "dynamic"
    assert second[-1].text == "\nReason: "


async def test_a_failing_node_cancels_in_flight_work_and_is_named():
    @cg.tool
    def explode(question: str) -> str:
        raise ValueError("the tool broke")

    @cg.app
    def fails(question: str):
        return {
            "slow": shapes.argue_for(question),
            "bad": shapes.reply(question, explode(question)),
        }

    llm = FakeLLM(reply=lambda p: " ".join(["w"] * 64), token_delay=0.05)
    runtime = Runtime(llm)
    with pytest.raises(
        NodeExecutionError, match=r"node 'explode' \(tool\) failed: ValueError: the tool broke"
    ) as info:
        await runtime.run(fails, question="q")
    assert info.value.node == "explode" and isinstance(info.value.__cause__, ValueError)
    await asyncio.sleep(0)
    assert [rid for rid in llm.aborted if ":argue_for.argument" in rid]
    assert not [rid for rid in llm.prompts if ":reply.reply" in rid]


async def test_timeout_names_the_nodes_still_running():
    llm = FakeLLM(reply=lambda p: " ".join(["w"] * 64), token_delay=0.05)
    runtime = Runtime(llm, timeout_s=30)
    runtime.set_timeout("debate", 0.1)
    with pytest.raises(
        AppTimeoutError,
        match=r"'debate' timed out after 0.1s; still running: "
        r"argue_against, argue_for",
    ):
        await runtime.run(shapes.branch(), question="q")
    assert len(llm.aborted) == 2


async def test_choices_reach_the_engine_as_sampling_params():
    llm = FakeLLM(reply=lambda p: "for")
    out = await Runtime(llm).run(shapes.merge(), question="q")
    (rid,) = [r for r in llm.params if ":judge.verdict" in r]
    assert llm.params[rid].choices == ("for", "against")
    assert out["verdict"] == "for"


async def test_bad_inputs_and_unbound_retrievers_are_clear_errors():
    runtime = Runtime(FakeLLM())
    with pytest.raises(InvalidRequestError, match=r"missing input\(s\) 'question'"):
        await runtime.run(shapes.branch())
    unknown = r"unknown input 'qestion'; did you mean 'question'\?"
    with pytest.raises(InvalidRequestError, match=unknown):
        await runtime.run(shapes.branch(), question="q", qestion="q")
    with pytest.raises(RetrieverNotBoundError, match=r"no retriever bound to index 'default'"):
        await runtime.run(shapes.linear(), question="q")
    for bad in (0, -1.5, float("nan"), "10", True):
        with pytest.raises(ConfigError, match="timeout_s must be a positive number"):
            Runtime(FakeLLM(), timeout_s=bad)
    with pytest.raises(ConfigError, match="timeout_s must be a positive number"):
        runtime.set_timeout("debate", 0)


async def test_priorities_and_trace_come_from_the_plan_and_the_engine():
    app = shapes.two_outputs()
    llm = FakeLLM(reply=lambda p: "a b c", cached_tokens=4)
    result = await Runtime(llm, retrievers={"default": FakeIndex()}).run_traced(app, question="q")
    for rid, priority in llm.priorities.items():
        node = rid.split(":")[1].split(".")[0]
        assert priority == app.plan.nodes[node].priority
    trace = result.trace
    assert trace.generated_tokens == 6 and trace.cached_tokens == 8
    assert trace.nodes["title"].requests[0].prompt_tokens == 5
    assert all(n.status == "ok" and n.duration >= 0 for n in trace.nodes.values())
    assert trace.end is not None and trace.end >= max(n.end for n in trace.nodes.values())


async def test_a_failing_fan_out_element_cancels_its_siblings():
    started: list[int] = []
    cancelled: list[int] = []

    @cg.tool
    async def fetch(n: int) -> str:
        started.append(n)
        if n == 2:
            raise KeyError(n)
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(n)
            raise
        return str(n)

    @cg.app
    def fan(numbers: list[int]):
        return cg.map(fetch, over=numbers)

    with pytest.raises(NodeExecutionError, match=r"node 'map_fetch' \(map\) failed: KeyError"):
        await asyncio.wait_for(Runtime(FakeLLM()).run(fan, numbers=[1, 2, 3]), timeout=5)
    assert sorted(started) == [1, 2, 3] and sorted(cancelled) == [1, 3]


@cg.function
def joined(q: str, ctx: str) -> str:
    return f"{q}|{ctx}"


@cg.app
def with_context(q: str, ctx: str = "none"):
    return joined(q, ctx)


async def test_a_plan_binds_the_wiring_function_s_defaults_as_its_app_does():
    runtime = Runtime(FakeLLM())
    for target in (with_context, with_context.plan, with_context.optimize(passes=())):
        assert await runtime.run(target, "x") == {"result": "x|none"}
        assert await runtime.run(target, "x", ctx="c") == {"result": "x|c"}
