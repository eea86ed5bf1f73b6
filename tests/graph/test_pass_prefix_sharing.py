"""Pass 2 alone: which calls share a leading prefix, how long it is, and whether they reach
the engine together (in-batch prefix wait) or at different times (prefix cache only)."""

from __future__ import annotations

import pytest

import covey.graph as cg
from covey.graph.annotations import SharedPrefixes, read_graph
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
    # wiring, expected groups as (nodes, shared segments, first shared kind, together)
    (same_call_twice, [(("title", "title_2"), 3, "static", True)]),
    (shared_variable, [(("summarize_it", "translate_it"), 1, "dynamic", True)]),
    (different_literals, []),  # "[news] " and "[sport] " differ after one character
    (same_literal, [(("tagged", "tagged_2"), 1, "static", False)]),  # one waits for title
    (long_common_start, [(("in_french", "in_german"), 1, "static", True)]),
    (different_starts, []),
]


def groups(graph):
    shared = read_graph(graph, SharedPrefixes)
    assert shared is not None
    return shared.groups


@pytest.mark.parametrize("wiring, expected", CASES, ids=[c[0].__name__ for c in CASES])
def test_prefix_groups(wiring, expected):
    app = cg.App(wiring)
    out = prefix_sharing(app.graph)
    got = [(g.nodes, g.num_segments, g.segments[0].kind, g.together) for g in groups(out)]
    assert got == expected
    record = out.graph["passes"][-1]
    assert record.fired is bool(expected)
    assert [g.id for g in groups(out)] == [f"P{i}" for i in range(1, len(expected) + 1)]


def test_literal_joins_the_static_text_around_it():
    out = prefix_sharing(cg.App(same_literal).graph)
    (group,) = groups(out)
    assert group.segments[0].text == "[news] "
    assert out.graph["passes"][-1].reasons[0].endswith(
        "start at different times: later ones may hit the prefix cache"
    )


def test_partial_static_segment_keeps_the_common_start():
    (group,) = groups(prefix_sharing(cg.App(long_common_start).graph))
    assert group.segments[0].text == "You are a helpful assistant for the docs. Reply in "
    assert group.segments[0].role == "system"


def test_fan_out_shares_what_precedes_the_element():
    out = prefix_sharing(shapes.map_reduce().graph)
    fan = next(g for g in groups(out) if g.fan_out)
    assert fan.nodes == ("map_summarize",) and fan.together
    assert [p.kind for p in fan.segments] == ["static", "dynamic", "static"]
    reason = out.graph["passes"][-1].reasons[0]
    assert reason.startswith(f"{fan.id}: each element of map_summarize share 3 leading")
    assert reason.endswith("reach the engine together: prefilled once (in-batch prefix wait)")
