"""The RAG apps send their passages as chunk segments, so an engine with a chunk store
reuses them; exact reuse changes no greedy output (real model, tiny index)."""

from __future__ import annotations

from covey.apps.advanced_rag import build_advanced_rag_app
from covey.apps.rag_chatbot import build_rag_app
from covey.llm_backend.async_llm import AsyncLLM
from covey.retrieval.default_corpus import DEFAULT_INDEX_NAME
from covey.runtime import Runtime
from tests.runtime.conftest import make_cpu_engine

RAG = build_rag_app(k=3, max_tokens=8)
ADVANCED = build_advanced_rag_app(
    angles=("Write it as a search query.",), per_query_k=3, top_k=3, subquery_max_tokens=8,
    answer_max_tokens=8,
)
QUESTIONS = ("How do I make sure a file gets closed?", "How do I loop over a list?")


async def run_all(index, rounds: int, **config) -> tuple[list[dict], dict]:
    """Each app on each question, `rounds` times (the second time finds the chunks). The
    stats carry, per round, the advanced answer's trace records (`answers`)."""
    llm = AsyncLLM(engine=make_cpu_engine(**config))
    runtime = Runtime(llm, retrievers={DEFAULT_INDEX_NAME: index})
    outputs, answers = [], []
    try:
        for _ in range(rounds):
            for question in QUESTIONS:
                rag = await runtime.run(RAG, question=question, history="")
                advanced = await runtime.run_traced(ADVANCED, question=question)
                answers.append(advanced.trace.nodes["answer_from_passages"].requests[0])
                outputs.append({"rag": rag["answer"], "advanced": advanced.outputs["answer"]})
        stats = (await llm.stats()).chunk_cache
    finally:
        await llm.close()
    return outputs, {**stats, "answers": answers}


async def test_exact_chunk_reuse_gives_the_same_answers_as_no_reuse(tiny_index):
    # Greedy: without chunk reuse a second round would answer as the first, so one will do.
    off, off_stats = await run_all(tiny_index, 1, chunk_cache="off")
    # With the prefix cache off, only the chunk store can serve the second round's chunks:
    # a prefix-cache hit cannot pass for chunk reuse.
    exact, stats = await run_all(tiny_index, 2, chunk_cache="exact", enable_prefix_caching=False)
    assert exact == off * 2
    assert all(o["rag"] and o["advanced"] for o in off)
    assert stats["pool"]["reused_tokens"] == 0, stats
    assert stats["host"]["hits"] > 0 and stats["host"]["reused_tokens"] > 0, stats
    # The trace says what each call reused: nothing without a store; in the second round
    # the answer's prompt repeats exactly, so its passages come from the store.
    assert all(r.reused_tokens == 0 and r.ttft > 0 for r in off_stats["answers"])
    second = stats["answers"][len(QUESTIONS) :]
    assert all(r.reused_tokens > r.prompt_tokens // 2 and r.ttft > 0 for r in second), second
