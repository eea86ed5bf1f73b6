"""Table-driven: each graph shape gets the expected deps, sharing, segments, priorities."""

from __future__ import annotations

import pytest

import covey.graph as cg
from covey.graph.lowering import known_prefix
from covey.graph.passes import Priorities
from covey.graph.shared_prefixes import shared_prefixes
from tests.graph import shapes

CASES = {
    "linear": dict(
        build=shapes.linear,
        deps={"rewrite": (), "retrieve": ("rewrite",), "answer": ("retrieve",)},
        prefixes=[],
        priorities={"rewrite": 0, "retrieve": 0, "answer": 0},
        kinds={"answer": ["static", "static", "dynamic", "static", "chunk"]},
    ),
    "branch": dict(
        build=shapes.branch,
        deps={"argue_for": (), "argue_against": ()},
        prefixes=[(("argue_against", "argue_for"), 2, False, True)],
        priorities={"argue_for": 0, "argue_against": 1},
        kinds={"argue_for": ["static", "dynamic", "static"]},
    ),
    "merge": dict(
        build=shapes.merge,
        deps={"argue_for": (), "argue_against": (), "judge": ("argue_against", "argue_for")},
        prefixes=[(("argue_against", "argue_for"), 2, False, True)],
        priorities={"argue_for": 0, "argue_against": 1, "judge": 0},
        kinds={"judge": ["static", "dynamic", "static", "dynamic", "static"]},
    ),
    "map_reduce": dict(
        build=shapes.map_reduce,
        deps={"retrieve": (), "map_summarize": ("retrieve",), "combine": ("map_summarize",)},
        prefixes=[(("map_summarize",), 3, True, True)],
        priorities={"retrieve": 0, "map_summarize": 2, "combine": 0},
        kinds={"map_summarize": ["static", "dynamic", "static", "chunk", "static"]},
    ),
    "tool_chain": dict(
        build=shapes.tool_chain,
        deps={"rewrite": (), "lookup": ("rewrite",), "bullet": ("lookup",), "reply": ("bullet",)},
        prefixes=[],
        priorities={"rewrite": 0, "lookup": 0, "bullet": 0, "reply": 0},
        kinds={"reply": ["static", "dynamic", "static", "dynamic"]},
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
def test_shape_plan(case):
    plan = case["build"]().plan
    assert {n: p.deps for n, p in plan.nodes.items()} == case["deps"]
    got = [(g.nodes, g.num_segments, g.fan_out, g.together) for g in shared_prefixes(plan)]
    assert got == case["prefixes"]
    assert {n: plan.nodes[n].priority for n in case["priorities"]} == case["priorities"]
    for node, kinds in case["kinds"].items():
        prims = plan.nodes[node].primitives
        assert [p.kind for p in prims if p.op == "prefill"] == kinds
        assert prims[-1].op == "decode"


def test_map_reduce_item_is_per_element_and_fan_out_objective():
    plan = shapes.map_reduce().plan
    node = plan.nodes["map_summarize"]
    item = [p for p in node.primitives if p.per_item]
    assert [p.var for p in item] == ["retrieve.results[i]"]
    assert node.priority == Priorities().batch
    assert "map_summarize: priority 2 (batch: fan-out consumed together by its reduce)" in (
        plan.passes[-1].reasons
    )
    assert plan.outputs["answer"].node == "combine"


def test_awaiting_one_output_sends_the_other_to_background():
    app = shapes.two_outputs()
    # Both awaited by default: the reply waits for the slower answer, so title has slack.
    assert app.plan.nodes["title"].priority == 1
    plan = app.optimize(awaited=["answer"])
    assert plan.nodes["title"].priority == Priorities().background == 3
    assert "title: priority 3 (background: feeds only outputs nobody awaits)" in (
        plan.passes[-1].reasons
    )
    assert plan.nodes["answer"].priority == 0


def test_choices_reach_the_decode_primitive():
    decode = shapes.merge().plan.nodes["judge"].primitives[-1]
    assert decode.choices == ("for", "against")
    assert decode.var == "judge.verdict"


def test_tool_and_function_nodes_carry_their_callables_and_types():
    app = shapes.tool_chain()
    assert app.name == "agent" and repr(app) == "App(agent(question: str) -> reply)"
    lookup, bullet = app.plan.nodes["lookup"], app.plan.nodes["bullet"]
    assert (lookup.kind, bullet.kind) == ("tool", "function")
    assert lookup.op.fn("q") == ["q"] and bullet.op.returns is str
    assert bullet.args["facts"].name == "lookup.result"
    # the prefix known at run start stops at the first segment that waits for upstream nodes
    prims = app.plan.nodes["reply"].primitives
    known = prims[: known_prefix(prims, app.plan.inputs)]
    assert [p.describe() for p in known] == [
        "prefill[static,pin]('Answer from the facts.')",
        "prefill[dynamic](question)",
        "prefill[static]('\\nFacts:\\n')",
    ]
    assert known_prefix(prims, {"question", "bullet.result"}) == len(prims) - 1


def test_map_over_a_tool_is_a_fan_out_without_llm_primitives():
    @cg.tool
    def fetch(url: str) -> str:
        return url

    @cg.app
    def crawl(question: str):
        pages = cg.map(fetch, over=shapes.lookup(question))
        return shapes.reply(question, shapes.bullet(pages))

    node = crawl.plan.nodes["map_fetch"]
    assert node.kind == "map" and node.primitives == () and node.priority == Priorities().batch
    assert node.args["url"].type == list[str]
    assert crawl.graph.nodes["map_fetch"]["op"].outputs == {"result": list[str]}
    assert [n.name for n in crawl.plan.llm_calls()] == ["reply"]
