"""Pass 1 alone: pruning, stages, batch groups, and that the input graph is untouched."""

from __future__ import annotations

import warnings

import covey.graph as cg
from covey.errors import UnusedOutputWarning
from covey.graph.passes import prune_and_parallelize
from tests.graph import shapes


def test_independent_branches_become_one_parallel_stage():
    app = shapes.merge()
    out = prune_and_parallelize(app.graph)
    assert out.graph["stages"] == (("argue_against", "argue_for"), ("judge",))
    assert out.nodes["argue_for"]["batch_group"] == out.nodes["argue_against"]["batch_group"]
    record = out.graph["passes"][-1]
    assert record.name == "prune_and_parallelize" and record.fired
    assert "stage 0 submits LLM calls argue_against, argue_for together" in record.reasons


def test_pure_function_leaves_its_input_alone():
    app = shapes.merge()
    before = dict(app.graph.nodes["judge"])
    prune_and_parallelize(app.graph)
    assert dict(app.graph.nodes["judge"]) == before and app.graph.graph["passes"] == ()


def test_retrieval_beside_an_llm_call_is_parallel_but_not_batched():
    app = shapes.two_outputs()
    out = prune_and_parallelize(app.graph)
    assert out.graph["stages"][0] == ("retrieve", "title")
    assert out.nodes["title"]["batch_group"] is None


def test_dead_branch_is_pruned_and_recorded():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedOutputWarning)

        @cg.app
        def extra(q: str):
            shapes.rewrite(shapes.title(q))
            return shapes.title(q)

    out = prune_and_parallelize(extra.graph)
    assert set(out) == {"title_2"}
    assert out.graph["passes"][-1].reasons[:2] == (
        "pruned rewrite: none of its outputs reaches an app output",
        "pruned title: none of its outputs reaches an app output",
    )


def test_linear_chain_does_not_fire():
    out = prune_and_parallelize(shapes.linear().graph)
    assert not out.graph["passes"][-1].fired
