"""Retrieval-prefill pipelining: a retrieval's chunks are warmed in the engine as soon as it
returns, while the nodes after it still run; a warm never fails or outlives its run."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import covey.graph as cg
from covey.errors import EngineError
from covey.llm_backend.engine_client import EngineCapabilities
from covey.llm_backend.segments import Segment
from covey.retrieval.documents import Chunk, SearchResult
from covey.runtime import Runtime

from .fakes import DEFAULT_CAPABILITIES, FakeLLM

CHUNKS = EngineCapabilities(**{**DEFAULT_CAPABILITIES.__dict__, "chunks": True})


class Index:
    def search(self, query, k=None, mode=None, sources=None) -> list[SearchResult]:
        return [SearchResult(Chunk(f"c{i}", f"text {i}", "doc", 0, 6, 2), 1.0) for i in range(3)]


@cg.semantic_function
def answer(question: str, context: list[SearchResult]):
    """{{#user}}
    {{question}}
    {{context}}
    {{#assistant}}
    {{gen answer max_tokens=4}}"""


def build(seen: list[int], llm: FakeLLM):
    """retrieve -> a slow fusion step (which records how many warms had started by the time
    it ran) -> answer."""

    async def fuse(results: list[SearchResult]) -> list[SearchResult]:
        await asyncio.sleep(0.05)
        seen.append(len(llm.warmed))
        return results[:2]

    fusion = cg.function(fuse)

    @cg.app(name="warmed")
    def app(question: str):
        results = cg.retrieve(question, k=3, index="docs")
        return {"answer": answer(question=question, context=fusion(results=results))}

    return app


def runtime(llm: FakeLLM, optimize: bool = True) -> Runtime:
    return Runtime(llm, {"docs": Index()}, optimize=optimize)


async def test_a_retrievals_chunks_are_warmed_while_the_next_node_runs():
    llm = FakeLLM(capabilities=CHUNKS)
    seen: list[int] = []
    result = await runtime(llm).run_traced(build(seen, llm), question="Why?")
    assert seen == [1]  # the warm was under way before fusion finished
    assert llm.warmed == [
        [Segment(f"text {i}", kind="chunk", chunk_id=f"c{i}") for i in range(3)]
    ]
    node = result.trace.nodes["retrieve"]
    assert (node.warmed_chunks, node.loaded_chunks) == (3, 3)
    (prompt,) = [p for rid, p in llm.prompts.items() if "answer" in rid]
    # The prompt carries the very segments that were warmed.
    assert [s for s in prompt if s.kind == "chunk"] == llm.warmed[0][:2]


async def test_no_warm_without_a_chunk_store_or_in_the_naive_plan():
    for llm, optimize in ((FakeLLM(), True), (FakeLLM(capabilities=CHUNKS), False)):
        seen: list[int] = []
        outputs = await runtime(llm, optimize).run(build(seen, llm), question="Why?")
        assert outputs == {"answer": "alpha beta"}
        assert llm.warmed == [] and seen == [0]


@dataclass
class FailingWarm(FakeLLM):
    async def warm_chunks(self, chunks: list[Segment], compute: bool = False) -> int:
        raise EngineError("the chunk store is on fire")


async def test_a_failing_warm_is_logged_and_the_run_goes_on(caplog):
    llm = FailingWarm(capabilities=CHUNKS)
    with caplog.at_level(logging.WARNING, logger="covey.runtime.chunk_warming"):
        outputs = await runtime(llm).run(build([], llm), question="Why?")
    assert outputs == {"answer": "alpha beta"}
    (record,) = caplog.records
    assert "warming 3 chunk(s) of node 'retrieve' failed" in record.getMessage()
    assert "the chunk store is on fire" in record.getMessage()


@dataclass
class EndlessWarm(FakeLLM):
    cancelled: list[bool] = field(default_factory=list)

    async def warm_chunks(self, chunks: list[Segment], compute: bool = False) -> int:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.append(True)
            raise
        return 0


async def test_a_warm_still_running_is_cancelled_with_its_run():
    llm = EndlessWarm(capabilities=CHUNKS)
    outputs = await asyncio.wait_for(runtime(llm).run(build([], llm), question="Why?"), 5)
    assert outputs == {"answer": "alpha beta"}
    assert llm.cancelled == [True]
    assert not [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "ChunkWarmer._warm"]
