"""Pass 1: prune nodes no output needs, then group the rest into parallel stages.

A stage is a topological generation: its nodes depend only on earlier stages, so they run
concurrently. LLM calls in one stage form a batch group, submitted to the engine together
so it batches their prefills and decodes (Parrot, Teola).
"""

from __future__ import annotations

import networkx as nx

from covey.graph.ir import llm_template
from covey.graph.passes.record import recorded

NAME = "prune_and_parallelize"


def _needed(graph: nx.DiGraph) -> set[str]:
    """Nodes an app output depends on, plus tools (kept for their side effects)."""
    roots = {v.node for v in graph.graph["outputs"].values() if v.node is not None}
    roots |= {n for n, d in graph.nodes(data=True) if d["op"].kind == "tool"}
    needed = set(roots)
    for root in roots:
        needed |= nx.ancestors(graph, root)
    return needed


def prune_and_parallelize(graph: nx.DiGraph) -> nx.DiGraph:
    g = graph.copy()
    reasons = []
    needed = _needed(g)
    for node in sorted(set(g) - needed):
        g.remove_node(node)
        reasons.append(f"pruned {node}: none of its outputs reaches an app output")
    stages = tuple(tuple(sorted(gen)) for gen in nx.topological_generations(g))
    for index, stage in enumerate(stages):
        llm = [n for n in stage if llm_template(g.nodes[n]["op"]) is not None]
        for n in stage:
            g.nodes[n]["stage"] = index
            g.nodes[n]["batch_group"] = f"S{index}" if len(llm) > 1 and n in llm else None
        if len(stage) > 1:
            reasons.append(f"stage {index} runs {', '.join(stage)} in parallel")
        if len(llm) > 1:
            reasons.append(f"stage {index} submits LLM calls {', '.join(llm)} together")
    for n, d in g.nodes(data=True):
        if d["op"].kind == "map":
            reasons.append(f"{n} fans out: its elements are submitted together")
    g.graph["stages"] = stages
    return recorded(g, NAME, reasons)
