"""Pass 1: prune the nodes no app output needs, so no later pass plans them and the
runtime never runs them.

Nothing here decides what runs in parallel: the runtime starts every node as soon as the
nodes it reads from finish, and hands each LLM call that became ready in the same
event-loop turn to the engine together, so the engine batches them (Parrot, Teola).
`explain()` shows that order, derived from each node's dependencies.
"""

from __future__ import annotations

import networkx as nx

from covey.graph.passes.record import recorded

NAME = "prune_unused"


def _needed(graph: nx.DiGraph) -> set[str]:
    """Nodes an app output depends on, plus tools (kept for their side effects)."""
    roots = {v.node for v in graph.graph["outputs"].values() if v.node is not None}
    roots |= {n for n, d in graph.nodes(data=True) if d["op"].kind == "tool"}
    needed = set(roots)
    for root in roots:
        needed |= nx.ancestors(graph, root)
    return needed


def prune_unused(graph: nx.DiGraph) -> nx.DiGraph:
    g = graph.copy()
    reasons = []
    for node in sorted(set(g) - _needed(g)):
        g.remove_node(node)
        reasons.append(f"pruned {node}: none of its outputs reaches an app output")
    return recorded(g, NAME, reasons)
