"""The Plan: what the optimizer decided, in the shape an asyncio executor consumes.

The executor starts a node when its `deps` are done (stages only say what can overlap),
submits each LLM call's `primitives` with its `priority`, prefills `early` segments at
request start, and forks `prefix_groups` from one prefill.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from covey.graph.ir import Const, NodeKind, Op, Var
from covey.graph.lowering import Primitive
from covey.graph.passes import PassRecord, PrefixGroup
from covey.graph.types import type_name


@dataclass(frozen=True)
class NodePlan:
    """One node after optimization; `args` maps each input to a variable name or literal."""

    name: str
    kind: NodeKind
    op: Op
    args: dict[str, Var | Const]
    deps: tuple[str, ...]
    stage: int
    priority: int
    objective: str
    critical: bool
    batch_group: str | None
    prefix_groups: tuple[str, ...]
    primitives: tuple[Primitive, ...]


@dataclass(frozen=True)
class Plan:
    app: str
    inputs: dict[str, Any]
    outputs: dict[str, Var]
    awaited: tuple[str, ...]
    stages: tuple[tuple[str, ...], ...]
    nodes: dict[str, NodePlan]
    prefix_groups: tuple[PrefixGroup, ...]
    passes: tuple[PassRecord, ...]
    graph: nx.DiGraph = field(compare=False, repr=False)

    def llm_calls(self) -> list[NodePlan]:
        return [n for n in self.nodes.values() if n.primitives]

    def explain(self) -> str:
        from covey.graph.explain import explain

        return explain(self)


def _node(g: nx.DiGraph, n: str) -> NodePlan:
    d = g.nodes[n]
    return NodePlan(
        name=n,
        kind=d["op"].kind,
        op=d["op"],
        args=d["args"],
        deps=tuple(sorted(g.predecessors(n))),
        stage=d["stage"],
        priority=d["priority"],
        objective=d["objective"],
        critical=d["critical"],
        batch_group=d["batch_group"],
        prefix_groups=d["prefix_groups"],
        primitives=d["primitives"],
    )


def build_plan(g: nx.DiGraph) -> Plan:
    """Collect an optimized graph's annotations; `g` must have been through every pass."""
    return Plan(
        app=g.graph["app"],
        inputs={n: v.type for n, v in g.graph["inputs"].items()},
        outputs=dict(g.graph["outputs"]),
        awaited=g.graph.get("awaited") or tuple(g.graph["outputs"]),
        stages=g.graph["stages"],
        nodes={n: _node(g, n) for n in nx.topological_sort(g)},
        prefix_groups=g.graph["prefix_groups"],
        passes=g.graph["passes"],
        graph=g,
    )


def signature(types: dict[str, Any]) -> str:
    return ", ".join(f"{n}: {type_name(t)}" for n, t in types.items())
