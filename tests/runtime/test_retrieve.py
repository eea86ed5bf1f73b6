"""Retrieve nodes call a `Searcher`: its own k and mode unless the node gives them, and the
trace records what the search ran with."""

from __future__ import annotations

import dataclasses

import pytest

import covey.graph as cg
from covey.errors import ConfigError, InvalidRequestError
from covey.graph.plan import Plan
from covey.retrieval.documents import Chunk, SearchResult
from covey.retrieval.retriever import Retriever, RetrieverConfig
from covey.runtime import Runtime, SearchTrace
from tests.graph import shapes
from tests.retrieval.conftest import embedder, make_index, tokenizer  # noqa: F401

from .fakes import FakeLLM

TOPICS = ("for loops", "while loops", "with blocks", "try blocks", "dict keys", "lambdas")


class RecordingIndex:
    """`DocumentIndex.search`'s full shape (with a reranker); records every call as given."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def search(self, query, k=None, mode=None, sources=None, reranker=None):
        self.calls.append((query, k, mode, sources, reranker))
        return [SearchResult(Chunk(f"c{i}", f"text {i}", "doc", 0, 6, 2), 1.0) for i in range(k)]


def rerank(query: str, chunks: list[Chunk]) -> list[float]:
    return [1.0] * len(chunks)


@cg.app
def explicit(question: str):
    results = cg.retrieve(question, k=2, mode="bm25", index="default")
    return {"answer": shapes.answer(question=question, context=results)}


def without_k_and_mode(app: cg.App) -> Plan:
    """The app's plan with its retrieve node leaving k and mode to the searcher."""
    plan = app.plan
    nodes = {
        name: dataclasses.replace(n, op=dataclasses.replace(n.op, k=None, mode=None))
        if n.kind == "retrieve"
        else n
        for name, n in plan.nodes.items()
    }
    return dataclasses.replace(plan, nodes=nodes)


def retriever(index: RecordingIndex) -> Retriever:
    config = RetrieverConfig(k=3, mode="vector", sources=("doc*",))
    return Retriever(index, config, rerank)  # type: ignore[arg-type]


async def test_a_node_without_k_or_mode_searches_with_the_retrievers_own():
    index = RecordingIndex()
    runtime = Runtime(FakeLLM(), retrievers={"default": retriever(index)})
    result = await runtime.run_traced(without_k_and_mode(explicit), question="q")
    assert index.calls == [("q", 3, "vector", ["doc*"], rerank)]
    assert result.trace.nodes["retrieve"].search == SearchTrace("default", None, None, 3)


async def test_a_node_giving_k_and_mode_overrides_them_and_the_trace_says_so():
    index = RecordingIndex()
    runtime = Runtime(FakeLLM(), retrievers={"default": retriever(index)})
    result = await runtime.run_traced(explicit, question="q")
    # The node's k and mode win; the retriever's source filter and reranker still apply.
    assert index.calls == [("q", 2, "bm25", ["doc*"], rerank)]
    assert result.trace.nodes["retrieve"].search == SearchTrace("default", 2, "bm25", 2)


async def test_a_foreign_searchers_own_settings_are_left_to_it():
    index = RecordingIndex()
    index.search = lambda query, k=None, mode=None, sources=None: []  # type: ignore[method-assign]
    runtime = Runtime(FakeLLM(), retrievers={"default": index})
    result = await runtime.run_traced(without_k_and_mode(explicit), question="q")
    assert result.trace.nodes["retrieve"].search == SearchTrace("default", None, None, 0)


async def test_a_document_index_searches_with_its_defaults(make_index):  # noqa: F811
    tiny_docs = make_index()
    tiny_docs.add_texts([f"Python {t} are explained here." for t in TOPICS], source="doc")
    runtime = Runtime(FakeLLM(), retrievers={"default": tiny_docs})
    result = await runtime.run_traced(without_k_and_mode(explicit), question="for loops")
    assert result.trace.nodes["retrieve"].search == SearchTrace("default", None, None, 5)
    assert tiny_docs.search("for loops") == tiny_docs.search("for loops", 5, "hybrid")


def test_only_searchers_can_be_bound():
    with pytest.raises(ConfigError, match=r"retriever 'docs' must be a Searcher.*got list"):
        Runtime(FakeLLM(), retrievers={"docs": []})
    runtime = Runtime(FakeLLM())
    with pytest.raises(ConfigError, match=r"retriever 'docs' must be a Searcher.*got str"):
        runtime.bind_retriever("docs", "pydocs")
    assert runtime.retrievers == {}


def test_retriever_config_is_checked_in_one_place():
    with pytest.raises(InvalidRequestError, match="k must be a positive integer, got 0"):
        RetrieverConfig(k=0)
    with pytest.raises(InvalidRequestError, match="mode must be one of vector, bm25, hybrid"):
        RetrieverConfig(mode="fuzzy")
    index = RecordingIndex()
    r = Retriever(index, RetrieverConfig(k=2))  # type: ignore[arg-type]
    assert r.retrieve("q") == r.search("q")
    assert index.calls[0] == ("q", 2, "hybrid", None, None)
