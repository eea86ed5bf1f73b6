"""Typed pass annotations: what build_plan reads, and the loud failure of every slip."""

from __future__ import annotations

import networkx as nx
import pytest

from covey.errors import CoveyError, ErrorCategory, PlanError
from covey.graph.annotations import (
    IR_GRAPH_KEYS,
    NODE_ANNOTATIONS,
    Lowered,
    Priority,
    annotate,
    read,
)
from covey.graph.passes import PASSES, objective_deduction
from covey.graph.passes.record import recorded
from covey.graph.shared_prefixes import shared_prefixes
from tests.graph import shapes


def _custom(write):
    """A user pass that applies `write(graph)` to its copy and records itself."""

    def custom_pass(graph: nx.DiGraph) -> nx.DiGraph:
        g = graph.copy()
        write(g)
        return recorded(g, "custom", ["wrote something"])

    return custom_pass


def test_each_annotation_is_written_by_a_default_pass():
    names = {p.__name__ for p in PASSES}
    assert {cls.written_by for cls in NODE_ANNOTATIONS} <= names


def test_the_plan_reads_the_typed_annotations():
    plan = shapes.merge().plan
    graph = plan.graph
    for name, node in plan.nodes.items():
        assert node.priority == read(graph, name, Priority).value  # type: ignore[union-attr]
        assert node.primitives == read(graph, name, Lowered).primitives  # type: ignore[union-attr]
    assert set(graph.graph) <= set(IR_GRAPH_KEYS)  # nothing on the graph as a whole


def test_plan_error_is_an_internal_covey_error():
    assert issubclass(PlanError, CoveyError) and PlanError.category is ErrorCategory.INTERNAL


def test_a_misspelt_node_key_fails_loudly():
    def write(g):
        g.nodes["judge"]["priorty"] = 0

    with pytest.raises(PlanError) as e:
        shapes.merge().optimize(passes=(*PASSES, _custom(write)))
    msg = str(e.value)
    assert msg.startswith("app 'verdict', node 'judge': unknown annotation 'priorty'")
    assert "did you mean 'Priority'?" in msg


def test_a_misspelt_graph_key_fails_loudly():
    def write(g):
        g.graph["shared_prefixes"] = ()

    with pytest.raises(PlanError, match="app 'verdict': unknown annotation 'shared_prefixes'"):
        shapes.merge().optimize(passes=(_custom(write),))


def test_an_old_loose_key_is_no_longer_read():
    def write(g):
        g.nodes["judge"]["stage"] = 1

    with pytest.raises(PlanError, match="unknown annotation 'stage'"):
        shapes.merge().optimize(passes=(_custom(write),))


def test_a_value_of_the_wrong_type_written_by_hand_fails():
    def write(g):
        g.nodes["judge"]["Priority"] = 3

    with pytest.raises(PlanError, match=r"annotation Priority holds 3 \(int\); write it with"):
        shapes.merge().optimize(passes=(_custom(write),))


def test_annotate_refuses_what_is_not_an_annotation_of_that_scope():
    g = shapes.merge().graph.copy()
    with pytest.raises(PlanError, match="node 'judge': dict is not an annotation here"):
        annotate(g, "judge", {"priority": 0})
    (group,) = shared_prefixes(shapes.merge().plan)
    with pytest.raises(PlanError, match="node 'judge': PrefixGroup is not an annotation here"):
        annotate(g, "judge", group)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Priority("high"), "Priority.value must be an int, got 'high'"),
        (lambda: Priority(True), "Priority.value must be an int, got True"),
        (lambda: Lowered([]), "Lowered.primitives must be a tuple of Primitive, got []"),
        (lambda: Lowered(("x",)), "Lowered.primitives must be a tuple of Primitive"),
    ],
)
def test_annotation_fields_are_typed(make, message):
    with pytest.raises(PlanError) as e:
        make()
    assert message in str(e.value)


def test_a_pass_that_ran_but_left_a_node_unannotated_fails():
    def forgetful(graph: nx.DiGraph) -> nx.DiGraph:
        g = objective_deduction(graph)
        del g.nodes["judge"]["Priority"]
        return g

    with pytest.raises(
        PlanError,
        match="node 'judge': pass 'objective_deduction' ran but left no Priority",
    ):
        shapes.merge().optimize(passes=(forgetful,))


def test_a_pass_that_did_not_run_leaves_the_naive_choice():
    plan = shapes.merge().optimize(passes=())
    assert all(n.priority == 0 for n in plan.nodes.values())
    assert not any(p.pin for n in plan.nodes.values() for p in n.primitives)
