"""Optimizer passes, each a pure function Graph -> Graph that records what it did.

Each pass writes its decisions as typed annotations (`covey.graph.annotations`) that
`build_plan` reads, and appends a `PassRecord` saying why, for `explain()`.
"""

from __future__ import annotations

from collections.abc import Callable

import networkx as nx

from covey.graph.passes.decompose import prefill_decomposition
from covey.graph.passes.objectives import CostModel, Priorities, objective_deduction
from covey.graph.passes.prune import prune_unused
from covey.graph.passes.record import PassRecord

Pass = Callable[[nx.DiGraph], nx.DiGraph]

# Pruning runs first so later passes never plan dead nodes.
PASSES: tuple[Pass, ...] = (
    prune_unused,
    prefill_decomposition,
    objective_deduction,
)


def run_passes(graph: nx.DiGraph, passes: tuple[Pass, ...] = PASSES) -> nx.DiGraph:
    for p in passes:
        graph = p(graph)
    return graph


__all__ = [
    "PASSES",
    "CostModel",
    "PassRecord",
    "Priorities",
    "objective_deduction",
    "prefill_decomposition",
    "prune_unused",
    "run_passes",
]
