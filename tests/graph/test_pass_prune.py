"""Pass 1 alone: pruning, and that the input graph is untouched."""

from __future__ import annotations

import warnings

import covey.graph as cg
from covey.errors import UnusedOutputWarning
from covey.graph.passes import prune_unused
from tests.graph import shapes


def test_pure_function_leaves_its_input_alone():
    app = shapes.merge()
    before = dict(app.graph.nodes["judge"])
    prune_unused(app.graph)
    assert dict(app.graph.nodes["judge"]) == before and app.graph.graph["passes"] == ()


def test_dead_branch_is_pruned_and_recorded():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedOutputWarning)

        @cg.app
        def extra(q: str):
            shapes.rewrite(shapes.title(q))
            return shapes.title(q)

    out = prune_unused(extra.graph)
    assert set(out) == {"title_2"}
    record = out.graph["passes"][-1]
    assert record.name == "prune_unused" and record.fired
    assert record.reasons == (
        "pruned rewrite: none of its outputs reaches an app output",
        "pruned title: none of its outputs reaches an app output",
    )


def test_a_tool_nobody_reads_is_kept_for_its_side_effects():
    @cg.tool
    def notify(q: str) -> str:
        return q

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedOutputWarning)

        @cg.app
        def side(q: str):
            notify(q)
            return shapes.title(q)

    out = prune_unused(side.graph)
    assert set(out) == {"notify", "title"} and not out.graph["passes"][-1].fired


def test_nothing_to_prune_does_not_fire():
    out = prune_unused(shapes.linear().graph)
    assert not out.graph["passes"][-1].fired and set(out) == {"rewrite", "retrieve", "answer"}
