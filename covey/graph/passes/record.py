"""What each pass did, so the Plan (and `explain()`) can say which passes fired and why."""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx


@dataclass(frozen=True)
class PassRecord:
    name: str
    fired: bool
    reasons: tuple[str, ...]


def recorded(graph: nx.DiGraph, name: str, reasons: list[str]) -> nx.DiGraph:
    """Append a record to `graph` (already a copy owned by the pass) and return it."""
    record = PassRecord(name, bool(reasons), tuple(reasons))
    graph.graph["passes"] = (*graph.graph["passes"], record)
    return graph
