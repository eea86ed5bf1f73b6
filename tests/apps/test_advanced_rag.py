"""Advanced RAG end to end on the real model and the tiny index."""

from __future__ import annotations

from covey.apps.advanced_rag import build_advanced_rag_app
from covey.apps.citations import parse_citations

APP = build_advanced_rag_app(per_query_k=3, top_k=3, subquery_max_tokens=12, answer_max_tokens=16)


async def test_rewrites_retrieve_in_parallel_and_fuse(runtime, tiny_index):
    question = "How do I make sure a file gets closed?"
    run = await runtime.run_traced(APP, question=question)
    out, trace = run.outputs, run.trace
    queries = [out[f"query_{i}"] for i in (1, 2, 3)]
    assert out["answer"] and all(q.strip() for q in queries)
    results = out["results"]
    assert 0 < len(results) <= 3 and len({r.chunk.id for r in results}) == len(results)
    assert {r.chunk.id for r in results} <= {c.id for c in tiny_index.chunks}
    assert "pydoc:with" in [r.chunk.source for r in results]
    assert all(c.number <= len(results) for c in parse_citations(out["answer"], results))
    rewrites = ["rewrite_query", "rewrite_query_2", "rewrite_query_3"]
    assert trace.overlapped(rewrites[0], rewrites[2])  # independent rewrites run together
    assert trace.overlapped("retrieve", rewrites[0])  # the question is searched meanwhile
    assert all(trace.nodes[n].requests[0].generated_tokens <= 12 for n in rewrites)
