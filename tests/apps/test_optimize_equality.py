"""The optimizer changes how an app runs, never what it returns: with greedy decoding each
app gives identical outputs with `optimize=True` and with the naive plan, each on a fresh
engine so neither run warms the other's prefix cache."""

from __future__ import annotations

import pytest

from covey.apps.advanced_rag import build_advanced_rag_app
from covey.apps.mapreduce_summary import build_summary_app
from covey.apps.rag_chatbot import build_rag_app

from .conftest import DOCS, fresh_runtime

CASES = {
    "rag_chatbot": (
        build_rag_app(k=3, max_tokens=8),
        {"question": "What if a dictionary key is missing?", "history": ""},
    ),
    "advanced_rag": (
        build_advanced_rag_app(
            per_query_k=3, top_k=3, subquery_max_tokens=8, answer_max_tokens=8
        ),
        {"question": "How do I make sure a file gets closed?"},
    ),
    "mapreduce_summary": (
        build_summary_app(piece_chars=400, piece_max_tokens=8, summary_max_tokens=8),
        {"text": "\n\n".join(DOCS.values())},
    ),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_outputs_are_identical_with_the_optimizer_on_and_off(name, tiny_index):
    app, inputs = CASES[name]
    outputs = {}
    for optimize in (True, False):
        llm, runtime = fresh_runtime(tiny_index, optimize=optimize)
        try:
            outputs[optimize] = await runtime.run(app, **inputs)
        finally:
            await llm.close()
    assert outputs[True] == outputs[False]
    assert all(v for v in outputs[True].values())
