"""Pass 3: deduce each node's engine priority from the outputs the caller awaits.

Walk back from the outputs the caller awaits (graph attribute `awaited`); the reply is
ready when the last of them is, so nodes on the critical path (the longest estimated path
to any awaited output) get latency priority and the others have slack; a
fan-out's elements are consumed only together by its reduce, so they get batch priority
(throughput beats per-element latency there); nodes with slack come next; nodes that feed
only outputs nobody awaits run last (Parrot). Lower number = scheduled sooner.

The pass writes one `Priority` per node, which the runtime sends with each of the node's
engine requests (the scheduler admits waiting requests by it and preempts the lowest);
the objective and the critical path that chose it are kept only in the pass's record.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

from covey.graph.annotations import Priority, annotate
from covey.graph.control_ops import exclusive, guard_of
from covey.graph.ir import Op, llm_template
from covey.graph.passes.record import recorded

NAME = "objective_deduction"


@dataclass(frozen=True)
class Priorities:
    """Engine priorities (lower = sooner), one per objective."""

    latency: int = 0
    slack: int = 1
    batch: int = 2
    background: int = 3


@dataclass(frozen=True)
class CostModel:
    """Rough cost in decode-token equivalents; only the ordering of paths matters."""

    retrieve: int = 16
    tool: int = 32
    function: int = 1


def node_cost(op: Op, costs: CostModel = CostModel()) -> int:
    template = llm_template(op)
    if template is not None:
        return sum(g.params.max_tokens for g in template.gens)
    return {"retrieve": costs.retrieve, "tool": costs.tool}.get(op.kind, costs.function)


def _critical(g: nx.DiGraph, sinks: set[str]) -> set[str]:
    """Nodes with zero slack on the longest cost path that ends at an awaited sink."""
    cost = {n: node_cost(g.nodes[n]["op"]) for n in g}
    order = list(nx.topological_sort(g))
    up = {}
    for n in order:
        up[n] = cost[n] + max((up[p] for p in g.predecessors(n)), default=0)
    down = {}
    for n in reversed(order):
        tails = [down[s] for s in g.successors(n) if s in down]
        if n in sinks or tails:
            down[n] = cost[n] + max(tails, default=0)
    total = max(up[s] for s in sinks)
    return {n for n in down if up[n] + down[n] - cost[n] == total}


def _path(g: nx.DiGraph, nodes: list[str]) -> str:
    """`a -> b`, with `a | b` between alternatives (branches of one route: one runs)."""
    text = nodes[0]
    for a, b in zip(nodes, nodes[1:]):
        text += (" | " if exclusive(guard_of(g, a), guard_of(g, b)) else " -> ") + b
    return text


def objective_deduction(graph: nx.DiGraph, levels: Priorities = Priorities()) -> nx.DiGraph:
    g = graph.copy()
    outputs = g.graph["outputs"]
    awaited = g.graph.get("awaited") or tuple(outputs)
    sinks = {outputs[name].node for name in awaited if outputs[name].node in g}
    feeding = set(sinks).union(*(nx.ancestors(g, s) for s in sinks)) if sinks else set()
    critical = _critical(g, sinks) if sinks else set()
    order = list(nx.topological_sort(g))
    reasons = [f"awaited outputs: {', '.join(awaited)}"]
    if critical:
        reasons.append(f"critical path: {_path(g, [n for n in order if n in critical])}")
    for n in order:
        kind = g.nodes[n]["op"].kind
        if n not in feeding:
            objective, why = "background", "feeds only outputs nobody awaits"
        elif kind == "map":
            objective, why = "batch", "fan-out consumed together by its reduce"
        elif n in critical:
            objective, why = "latency", "on the critical path"
        else:
            objective, why = "slack", "off the critical path"
        priority = getattr(levels, objective)
        annotate(g, n, Priority(priority))
        if llm_template(g.nodes[n]["op"]) is not None:
            reasons.append(f"{n}: priority {priority} ({objective}: {why})")
    return recorded(g, NAME, reasons)
