"""Pass 2 alone: which calls share a leading prefix, and how long it is."""

from __future__ import annotations

import pytest

import covey.graph as cg
from covey.graph.passes import prefix_sharing
from tests.graph import shapes


@cg.semantic_function
def summarize_it(text: str):
    """{{text}}
    Summarize that. {{gen out}}"""


@cg.semantic_function
def translate_it(text: str):
    """{{text}}
    Translate that. {{gen out}}"""


@cg.semantic_function
def tagged(text: str, tag: str):
    """[{{tag}}] {{text}} {{gen out}}"""


def same_call_twice(q: str):
    return {"a": shapes.title(q), "b": shapes.title(q)}


def shared_variable(q: str):
    return {"a": summarize_it(q), "b": translate_it(q)}


def different_literals(q: str):
    return {"a": tagged(q, "news"), "b": tagged(q, "sport")}


def same_literal(q: str):
    return {"a": tagged(q, "news"), "b": tagged(shapes.title(q), "news")}


@cg.semantic_function
def in_french(question: str):
    """{{#system}}
    You are a helpful assistant for the docs. Reply in French.
    {{#user}}
    {{question}}
    {{#assistant}}
    {{gen out}}"""


@cg.semantic_function
def in_german(question: str):
    """{{#system}}
    You are a helpful assistant for the docs. Reply in German.
    {{#user}}
    {{question}}
    {{#assistant}}
    {{gen out}}"""


def long_common_start(q: str):
    return {"a": in_french(q), "b": in_german(q)}


def different_starts(q: str):
    return {"a": shapes.title(q), "b": summarize_it(q)}


CASES = [
    # wiring, expected groups as (nodes, number of shared segments, first shared kind)
    (same_call_twice, [(("title", "title_2"), 3, "static")]),
    (shared_variable, [(("summarize_it", "translate_it"), 1, "dynamic")]),
    (different_literals, []),  # "[news] " and "[sport] " differ after one character
    (same_literal, [(("tagged", "tagged_2"), 1, "static")]),
    (long_common_start, [(("in_french", "in_german"), 1, "static")]),
    (different_starts, []),
]


@pytest.mark.parametrize("wiring, expected", CASES, ids=[c[0].__name__ for c in CASES])
def test_prefix_groups(wiring, expected):
    app = cg.App(wiring)
    out = prefix_sharing(app.graph)
    got = [(g.nodes, g.num_segments, g.segments[0].kind) for g in out.graph["prefix_groups"]]
    assert got == expected
    record = out.graph["passes"][-1]
    assert record.fired is bool(expected)
    for nodes, _, _ in expected:
        assert all(out.nodes[n]["prefix_groups"] == ("P1",) for n in nodes)


def test_literal_joins_the_static_text_around_it():
    (group,) = prefix_sharing(cg.App(same_literal).graph).graph["prefix_groups"]
    assert group.segments[0].text == "[news] "


def test_partial_static_segment_keeps_the_common_start():
    (group,) = prefix_sharing(cg.App(long_common_start).graph).graph["prefix_groups"]
    assert group.segments[0].text == "You are a helpful assistant for the docs. Reply in "
    assert group.segments[0].role == "system"


def test_fan_out_shares_what_precedes_the_element():
    out = prefix_sharing(shapes.map_reduce().graph)
    groups = {g.id: g for g in out.graph["prefix_groups"]}
    fan = next(g for g in groups.values() if g.fan_out)
    assert fan.nodes == ("map_summarize",)
    assert [p.kind for p in fan.segments] == ["static", "dynamic", "static"]
    reason = out.graph["passes"][-1].reasons[0]
    assert reason.startswith(f"{fan.id}: each element of map_summarize share 3 leading")
