"""The Plan: what the optimizer decided, in the shape an asyncio executor consumes.

The executor starts a node when its `deps` are done (stages only say what can overlap),
submits each LLM call's `primitives` with its `priority`, prefills `early` segments at
request start and pins `pin` ones once per app. A `prefix_groups` fork needs no call of
its own: the group's calls reach the engine together, and the engine has all but the
first wait a step for the common prefix and reuse its KV.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from covey.graph.ir import Const, NodeKind, Op, Var
from covey.graph.lowering import Primitive, lower
from covey.graph.passes import PassRecord, PrefixGroup
from covey.graph.types import type_name


@dataclass(frozen=True)
class NodePlan:
    """One node after optimization; `args` maps each input to a variable or a literal.

    `batch_group`: LLM calls at the same dependency level; the runtime hands the ones that
    are ready to the engine in one step so they share a batch, never delaying a call to
    wait for the rest of its group. `prefix_groups`: ids of the PrefixGroups it forks from.
    """

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


def _node(g: nx.DiGraph, n: str, stage: int) -> NodePlan:
    """A node's annotations; a pass that did not run leaves the naive choice in place."""
    d = g.nodes[n]
    return NodePlan(
        name=n,
        kind=d["op"].kind,
        op=d["op"],
        args=d["args"],
        deps=tuple(sorted(g.predecessors(n))),
        stage=d.get("stage", stage),
        priority=d.get("priority", 0),
        objective=d.get("objective", "latency"),
        critical=d.get("critical", False),
        batch_group=d.get("batch_group"),
        prefix_groups=d.get("prefix_groups", ()),
        primitives=d.get("primitives") or lower(g, n),
    )


def build_plan(g: nx.DiGraph) -> Plan:
    """Collect the annotations the passes left on `g`, in topological order."""
    stages = g.graph.get("stages") or tuple(
        tuple(sorted(gen)) for gen in nx.topological_generations(g)
    )
    stage_of = {n: i for i, stage in enumerate(stages) for n in stage}
    return Plan(
        app=g.graph["app"],
        inputs={n: v.type for n, v in g.graph["inputs"].items()},
        outputs=dict(g.graph["outputs"]),
        awaited=g.graph.get("awaited") or tuple(g.graph["outputs"]),
        stages=stages,
        nodes={n: _node(g, n, stage_of[n]) for n in nx.topological_sort(g)},
        prefix_groups=g.graph.get("prefix_groups", ()),
        passes=g.graph["passes"],
        graph=g,
    )


def signature(types: dict[str, Any]) -> str:
    return ", ".join(f"{n}: {type_name(t)}" for n, t in types.items())
