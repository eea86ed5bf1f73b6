"""Pass 4 alone: critical path, fan-out batch priority, background for unawaited outputs."""

from __future__ import annotations

import covey.graph as cg
from covey.graph.passes import Priorities, objective_deduction
from tests.graph import shapes

DEFAULT = Priorities()


def deduce(app: cg.App, awaited=None, levels=DEFAULT):
    graph = app.graph.copy()
    graph.graph["awaited"] = awaited
    return objective_deduction(graph, levels)


def test_longer_branch_is_critical_shorter_has_slack():
    out = deduce(shapes.merge())
    assert out.nodes["argue_for"]["critical"] and out.nodes["judge"]["critical"]
    assert out.nodes["argue_against"]["objective"] == "slack"
    assert out.nodes["argue_against"]["priority"] == 1


def test_fan_out_gets_batch_priority_and_its_reduce_latency():
    out = deduce(shapes.map_reduce())
    assert (out.nodes["map_summarize"]["objective"], out.nodes["map_summarize"]["priority"]) == (
        "batch",
        2,
    )
    assert out.nodes["combine"]["priority"] == 0


def test_unawaited_output_runs_in_background():
    out = deduce(shapes.two_outputs(), awaited=("title",))
    assert out.nodes["title"]["priority"] == 0
    assert {out.nodes[n]["objective"] for n in ("retrieve", "answer")} == {"background"}
    reasons = out.graph["passes"][-1].reasons
    assert reasons[0] == "awaited outputs: title"
    assert "answer: priority 3 (background: feeds only outputs nobody awaits)" in reasons


def test_slow_tool_moves_the_critical_path():
    @cg.tool
    def lookup(question: str) -> str:
        return question

    @cg.app
    def both(q: str):
        return {"fact": lookup(q), "title": shapes.title(q)}  # title decodes 8 tokens

    out = deduce(both)
    assert out.nodes["lookup"]["critical"] and out.nodes["title"]["objective"] == "slack"


def test_priority_levels_are_configurable():
    out = deduce(shapes.map_reduce(), levels=Priorities(latency=5, batch=9))
    assert out.nodes["combine"]["priority"] == 5 and out.nodes["map_summarize"]["priority"] == 9
