"""Pass 3 alone: critical path, fan-out batch priority, background for unawaited outputs.

The pass writes one typed `Priority` per node; the objective and the critical path that
chose it are in its record."""

from __future__ import annotations

import covey.graph as cg
from covey.graph.annotations import Priority, read
from covey.graph.passes import Priorities, objective_deduction
from tests.graph import shapes

DEFAULT = Priorities()


def deduce(app: cg.App, awaited=None, levels=DEFAULT):
    graph = app.graph.copy()
    graph.graph["awaited"] = awaited
    return objective_deduction(graph, levels)


def priority(out, node: str) -> int:
    ann = read(out, node, Priority)
    assert ann is not None
    return ann.value


def test_longer_branch_is_critical_shorter_has_slack():
    out = deduce(shapes.merge())
    reasons = out.graph["passes"][-1].reasons
    assert "critical path: argue_for -> judge" in reasons
    assert "argue_against: priority 1 (slack: off the critical path)" in reasons
    assert (priority(out, "argue_for"), priority(out, "argue_against")) == (0, 1)


def test_fan_out_gets_batch_priority_and_its_reduce_latency():
    out = deduce(shapes.map_reduce())
    assert priority(out, "map_summarize") == DEFAULT.batch == 2
    assert priority(out, "combine") == DEFAULT.latency
    reasons = out.graph["passes"][-1].reasons
    assert "map_summarize: priority 2 (batch: fan-out consumed together by its reduce)" in reasons


def test_unawaited_output_runs_in_background():
    out = deduce(shapes.two_outputs(), awaited=("title",))
    assert priority(out, "title") == 0
    assert {priority(out, n) for n in ("retrieve", "answer")} == {DEFAULT.background}
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
    reasons = out.graph["passes"][-1].reasons
    assert "critical path: lookup" in reasons
    assert "title: priority 1 (slack: off the critical path)" in reasons


def test_priority_levels_are_configurable():
    out = deduce(shapes.map_reduce(), levels=Priorities(latency=5, batch=9))
    assert priority(out, "combine") == 5 and priority(out, "map_summarize") == 9
