"""Pass 2 alone: per-segment prefill + decode, pinned segments, and which leading segments
are known at run start (what prefill-ahead can prefill while upstream nodes run)."""

from __future__ import annotations

import pytest

import covey.graph as cg
from covey.graph.annotations import Lowered, read
from covey.graph.lowering import known_prefix
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
    """(op, kind, known at run start, pinned) per primitive."""
    lowered = read(prefill_decomposition(app.graph), node, Lowered)
    assert lowered is not None
    prims = lowered.primitives
    known = known_prefix(prims, set(app.inputs))
    return [(p.op, p.kind, i < known, p.pin) for i, p in enumerate(prims)]


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
    prims = read(out, "styled", Lowered).primitives  # type: ignore[union-attr]
    assert prims[0].text == "Style: terse. Question: "
    assert [p.var for p in prims if p.op == "decode"] == ["styled.answer", "styled.again"]
    assert prims[3].params.max_tokens == 256


def test_non_llm_nodes_have_no_primitives_and_reasons_name_the_calls():
    out = prefill_decomposition(shapes.linear().graph)
    assert read(out, "retrieve", Lowered) == Lowered(())
    reasons = out.graph["passes"][-1].reasons
    assert (
        "answer: 4 leading segment(s) known at run start; prefill-ahead prefills them while "
        "it waits for retrieve"
    ) in reasons
    assert "answer: pin 2 leading static segment(s) once per app" in reasons
    assert not any(r.startswith("rewrite: 2 leading") for r in reasons)  # waits for nothing
