"""Pass 2: calls whose prompts start alike prefill that prefix once and fork the KV.

Two leading segments are alike when they are the same static text in the same role, or
the same variable in the same place (Parrot context fork, SGLang fork). Static text that
differs only after a long common start (system prompts with a different last line) shares
that start as a partial segment; the engine's prefix cache matches the exact tokens. Each
element of a fan-out shares the segments before its per-element input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import networkx as nx

from covey.graph.lowering import Primitive, leading_prefill, lower
from covey.graph.passes.record import recorded

NAME = "prefix_sharing"
# Shorter common starts of differing static text are not worth a fork.
MIN_PARTIAL_CHARS = 32


@dataclass(frozen=True)
class PrefixGroup:
    """`nodes` share their first `num_segments` segments; `fan_out` when within one map."""

    id: str
    nodes: tuple[str, ...]
    segments: tuple[Primitive, ...]
    fan_out: bool = False

    @property
    def num_segments(self) -> int:
        return len(self.segments)


def _bucket(p: Primitive, node: str) -> tuple:
    """Calls that may share: same first segment, or static text with the same long start."""
    if p.kind == "static" and p.text is not None:
        return ("static", p.role, p.text[:MIN_PARTIAL_CHARS])
    return p.key(node)


def _common(prefixes: list[tuple[Primitive, ...]], nodes: list[str]) -> tuple[Primitive, ...]:
    shared: list[Primitive] = []
    for column in zip(*prefixes):
        if len({p.key(n) for p, n in zip(column, nodes)}) == 1:
            shared.append(column[0])
            continue
        if all(p.kind == "static" and p.role == column[0].role for p in column):
            text = os.path.commonprefix([p.text or "" for p in column])
            if len(text) >= MIN_PARTIAL_CHARS:
                shared.append(replace(column[0], text=text))
        break
    return tuple(shared)


def _groups(g: nx.DiGraph, prefixes: dict[str, tuple[Primitive, ...]]) -> list[PrefixGroup]:
    buckets: dict[tuple, list[str]] = {}
    for node, prims in prefixes.items():
        if prims and not prims[0].per_item:
            buckets.setdefault(_bucket(prims[0], node), []).append(node)
    groups = []
    for nodes in buckets.values():
        if len(nodes) > 1:
            shared = _common([prefixes[n] for n in nodes], nodes)
            groups.append(PrefixGroup("", tuple(nodes), shared))
    for node, prims in prefixes.items():
        if g.nodes[node]["op"].kind == "map":
            cut = next((i for i, p in enumerate(prims) if p.per_item), len(prims))
            shared = prims[:cut]
            if shared:
                groups.append(PrefixGroup("", (node,), shared, fan_out=True))
    return groups


def prefix_sharing(graph: nx.DiGraph) -> nx.DiGraph:
    g = graph.copy()
    prefixes = {n: leading_prefill(lower(g, n)) for n in sorted(g)}
    prefixes = {n: p for n, p in prefixes.items() if p}
    groups = [
        PrefixGroup(f"P{i}", grp.nodes, grp.segments, grp.fan_out)
        for i, grp in enumerate(_groups(g, prefixes), start=1)
    ]
    reasons = []
    for n in g:
        g.nodes[n]["prefix_groups"] = tuple(grp.id for grp in groups if n in grp.nodes)
    for grp in groups:
        what = " + ".join(p.describe() for p in grp.segments)
        who = f"each element of {grp.nodes[0]}" if grp.fan_out else ", ".join(grp.nodes)
        reasons.append(f"{grp.id}: {who} share {grp.num_segments} leading segment(s) {what}")
    g.graph["prefix_groups"] = tuple(groups)
    return recorded(g, NAME, reasons)
