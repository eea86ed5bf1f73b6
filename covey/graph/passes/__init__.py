"""Optimizer passes, each a pure function Graph -> Graph that records what it did."""

from __future__ import annotations

from collections.abc import Callable

import networkx as nx

from covey.graph.passes.decompose import prefill_decomposition
from covey.graph.passes.objectives import CostModel, Priorities, objective_deduction
from covey.graph.passes.parallelize import prune_and_parallelize
from covey.graph.passes.prefix_sharing import PrefixGroup, prefix_sharing
from covey.graph.passes.record import PassRecord

Pass = Callable[[nx.DiGraph], nx.DiGraph]

# Pruning runs first so later passes never plan dead nodes.
PASSES: tuple[Pass, ...] = (
    prune_and_parallelize,
    prefix_sharing,
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
    "PrefixGroup",
    "Priorities",
    "objective_deduction",
    "prefill_decomposition",
    "prefix_sharing",
    "prune_and_parallelize",
    "run_passes",
]
