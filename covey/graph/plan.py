"""The Plan: what the optimizer decided, in the shape an asyncio executor consumes.

Every decision in it is acted on. The executor starts a node as soon as the nodes in its
`deps` finish, and sends each LLM call's `primitives` to the engine with its `priority`;
prefill-ahead pins each call's `pin` segments once per app and, while a call waits on its
`deps`, prefills its leading segments already known (`Primitive.known`). The rest is the
record: `passes` says why each pass decided what it did and `graph` is the annotated graph
(for the Mermaid and DOT export). Where the engine shares prompt starts is not in the plan,
since nothing here decides it: calls that reach the engine together share their common
prefix through the scheduler's in-batch prefix wait, later ones through its prefix cache;
`covey.graph.shared_prefixes` derives it from the nodes' primitives and deps for
`explain()`.

`build_plan` reads the passes' typed annotations (`covey.graph.annotations`), so a
misspelt or mistyped one raises PlanError; a pass that did not run leaves the naive
choice: priority 0, primitives with nothing pinned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from covey.graph import annotations as ann
from covey.graph.control_ops import Guard, guard_of
from covey.graph.ir import Const, NodeKind, Op, Var
from covey.graph.lowering import Primitive, lower
from covey.graph.passes import PassRecord
from covey.graph.types import type_name


@dataclass(frozen=True)
class NodePlan:
    """One node after optimization; `args` maps each input to a variable or a literal."""

    name: str
    kind: NodeKind
    op: Op
    args: dict[str, Var | Const]
    deps: tuple[str, ...]
    priority: int
    primitives: tuple[Primitive, ...]
    guard: Guard = ()  # runs only when these hold (a route branch, a loop iteration)


@dataclass(frozen=True)
class Plan:
    app: str
    inputs: dict[str, Any]
    outputs: dict[str, Var]
    awaited: tuple[str, ...]
    nodes: dict[str, NodePlan]
    passes: tuple[PassRecord, ...]
    graph: nx.DiGraph = field(compare=False, repr=False)
    # the wiring function's defaults: a run of the plan binds inputs as a run of the app does
    defaults: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def llm_calls(self) -> list[NodePlan]:
        return [n for n in self.nodes.values() if n.primitives]

    def explain(self, capabilities: Any = None, engine_name: str = "engine") -> str:
        """`capabilities` (an `EngineCapabilities`): also say what that engine turns off."""
        from covey.graph.explain import explain

        return explain(self, capabilities, engine_name)


def _node(g: nx.DiGraph, n: str) -> NodePlan:
    d = g.nodes[n]
    priority = ann.read(g, n, ann.Priority)
    lowered = ann.read(g, n, ann.Lowered)
    return NodePlan(
        name=n,
        kind=d["op"].kind,
        op=d["op"],
        args=d["args"],
        deps=tuple(sorted(g.predecessors(n))),
        priority=priority.value if priority is not None else 0,
        primitives=lowered.primitives if lowered is not None else lower(g, n),
        guard=guard_of(g, n),
    )


def build_plan(g: nx.DiGraph) -> Plan:
    """Collect the annotations the passes left on `g`, in topological order; raises
    PlanError on an unknown, mistyped or missing one (see covey.graph.annotations)."""
    ann.check(g)
    return Plan(
        app=g.graph["app"],
        inputs={n: v.type for n, v in g.graph["inputs"].items()},
        outputs=dict(g.graph["outputs"]),
        awaited=g.graph.get("awaited") or tuple(g.graph["outputs"]),
        nodes={n: _node(g, n) for n in nx.topological_sort(g)},
        passes=g.graph["passes"],
        graph=g,
        defaults=dict(g.graph.get("defaults", {})),
    )


def signature(types: dict[str, Any]) -> str:
    return ", ".join(f"{n}: {type_name(t)}" for n, t in types.items())
