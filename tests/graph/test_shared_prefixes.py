"""The shared-prefix analysis alone: which calls share a leading prefix, how long it is, and
whether they reach the engine together (in-batch prefix wait) or at different times (prefix
cache only)."""

from __future__ import annotations

import pytest

import covey.graph as cg
from covey.graph.passes import PASSES
from covey.graph.shared_prefixes import sent_together, shared_prefixes
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


@pytest.mark.parametrize("wiring, expected", CASES, ids=[c[0].__name__ for c in CASES])
def test_prefix_groups(wiring, expected):
    groups = shared_prefixes(cg.App(wiring).plan)
    got = [(g.nodes, g.num_segments, g.segments[0].kind, g.together) for g in groups]
    assert got == expected
    assert [g.id for g in groups] == [f"P{i}" for i in range(1, len(expected) + 1)]


def test_sent_together_means_the_same_deps():
    plan = cg.App(same_literal).plan
    first, second = plan.nodes["tagged"], plan.nodes["tagged_2"]
    assert not sent_together(first, second)  # tagged_2 waits for title
    assert sent_together(first, plan.nodes["title"])  # both start at once
    assert "  tagged: priority 1, sent with title" in plan.explain()


def test_literal_joins_the_static_text_around_it():
    plan = cg.App(same_literal).plan
    (group,) = shared_prefixes(plan)
    assert group.segments[0].text == "[news] " and group.segments[0].pin
    assert "sent at different times: later ones reuse it only from the engine's prefix cache" in (
        plan.explain()
    )


def test_partial_static_segment_keeps_the_common_start():
    (group,) = shared_prefixes(cg.App(long_common_start).plan)
    assert group.segments[0].text == "You are a helpful assistant for the docs. Reply in "
    assert group.segments[0].role == "system"
    assert group.segments[0].pin  # both whole system prompts are pinned


def test_fan_out_shares_what_precedes_the_element():
    plan = shapes.map_reduce().plan
    fan = next(g for g in shared_prefixes(plan) if g.fan_out)
    assert fan.nodes == ("map_summarize",) and fan.together
    assert [p.kind for p in fan.segments] == ["static", "dynamic", "static"]
    text = plan.explain()
    assert f"  {fan.id}: elements of map_summarize share 3 segment(s): prefill[static" in text
    assert "sent together: the engine's in-batch prefix wait prefills the common blocks once" in (
        text
    )


def test_the_analysis_needs_no_pass():
    """The engine shares prompt starts whatever the passes decided, so the analysis reports
    the same groups for an unoptimized plan, only without pins."""
    app = shapes.merge()
    naive = shared_prefixes(app.optimize(passes=()))
    optimized = shared_prefixes(app.optimize(passes=PASSES))
    assert [(g.nodes, g.num_segments, g.together) for g in naive] == [
        (("argue_against", "argue_for"), 2, True)
    ]
    assert [(g.nodes, g.num_segments, g.together) for g in optimized] == [
        (g.nodes, g.num_segments, g.together) for g in naive
    ]
    assert not any(p.pin for g in naive for p in g.segments)
    assert optimized[0].segments[0].pin
