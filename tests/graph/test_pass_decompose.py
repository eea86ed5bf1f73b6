"""Pass 3 alone: per-segment prefill + decode, early and pinned segments."""

from __future__ import annotations

import pytest

import covey.graph as cg
from covey.graph.passes import prefill_decomposition
from tests.graph import shapes


@cg.semantic_function
def styled(question: str, style: str):
    """Style: {{style}}. Question: {{question}} {{gen answer}} Again: {{gen again}}"""


def with_literal(q: str):
    return styled(q, "terse").again


def after_llm(q: str):
    return styled(shapes.title(q), "terse").again


def flags(app: cg.App, node: str) -> list[tuple[str, str | None, bool, bool]]:
    prims = prefill_decomposition(app.graph).nodes[node]["primitives"]
    return [(p.op, p.kind, p.early, p.pin) for p in prims]


CASES = [
    (
        shapes.linear,
        "answer",
        [
            ("prefill", "static", True, True),  # system prompt
            ("prefill", "static", True, True),  # "Question: " (user)
            ("prefill", "dynamic", True, False),  # the request's question
            ("prefill", "static", True, False),  # "Context: " follows request data
            ("prefill", "chunk", False, False),  # waits for retrieval
            ("decode", None, False, False),
        ],
    ),
    (
        lambda: cg.App(with_literal),
        "styled",
        [
            ("prefill", "static", True, True),  # "Style: terse. Question: " with the literal
            ("prefill", "dynamic", True, False),
            ("prefill", "static", True, False),
            ("decode", None, False, False),
            ("prefill", "static", False, False),  # after a decode: prefilled once it is done
            ("decode", None, False, False),
        ],
    ),
    (
        lambda: cg.App(after_llm),
        "styled",
        [
            ("prefill", "static", True, True),
            ("prefill", "dynamic", False, False),  # an upstream output
            ("prefill", "static", False, False),
            ("decode", None, False, False),
            ("prefill", "static", False, False),
            ("decode", None, False, False),
        ],
    ),
    (
        shapes.map_reduce,
        "map_summarize",
        [
            ("prefill", "static", True, True),
            ("prefill", "dynamic", True, False),
            ("prefill", "static", True, False),
            ("prefill", "chunk", False, False),  # each element
            ("prefill", "static", False, False),
            ("decode", None, False, False),
        ],
    ),
]


@pytest.mark.parametrize("build, node, expected", CASES, ids=["rag", "literal", "upstream", "map"])
def test_segment_tags_and_flags(build, node, expected):
    assert flags(build(), node) == expected


def test_literal_is_static_text_and_decodes_carry_params():
    out = prefill_decomposition(cg.App(with_literal).graph)
    prims = out.nodes["styled"]["primitives"]
    assert prims[0].text == "Style: terse. Question: "
    assert [p.var for p in prims if p.op == "decode"] == ["styled.answer", "styled.again"]
    assert prims[3].params.max_tokens == 256


def test_non_llm_nodes_have_no_primitives_and_reasons_name_the_calls():
    out = prefill_decomposition(shapes.linear().graph)
    assert out.nodes["retrieve"]["primitives"] == ()
    reasons = out.graph["passes"][-1].reasons
    assert "answer: prefill 4 segment(s) early, before its inputs" in reasons
    assert "answer: pin 2 static segment(s) once per app" in reasons
