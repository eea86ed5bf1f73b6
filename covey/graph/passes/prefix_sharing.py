"""Pass 2: describe which LLM calls share a prompt start, and how the engine shares it.

Nothing here changes what runs: the sharing happens in the engine. The runtime hands
every call that became ready in the same event-loop turn to the engine together (calls
with the same dependencies, the elements of one fan-out); the scheduler's in-batch prefix
wait then makes a request whose next KV block another running request is computing wait
one step and reuse that block, so the common start is prefilled once (SGLang's in-batch
prefix caching, Parrot's context fork). A call that starts later can only find the
prefix in the engine's prefix cache. Sharing is in whole KV blocks of tokens, found by
the engine on the exact tokens; this pass reports it on the template segments.

Two leading segments are alike when they are the same static text in the same role, or
the same variable in the same place. Static text that differs only after a long common
start (system prompts with a different last line) shares that start as a partial
segment. Each element of a fan-out shares the segments before its per-element input.
"""

from __future__ import annotations

import os
from dataclasses import replace

import networkx as nx

from covey.graph.annotations import PrefixGroup, SharedPrefixes, annotate_graph
from covey.graph.lowering import Primitive, leading_prefill, lower
from covey.graph.passes.record import recorded

NAME = "prefix_sharing"
# Shorter common starts of differing static text are not worth reporting.
MIN_PARTIAL_CHARS = 32


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
            together = len({frozenset(g.predecessors(n)) for n in nodes}) == 1
            groups.append(PrefixGroup("", tuple(nodes), shared, together=together))
    for node, prims in prefixes.items():
        if g.nodes[node]["op"].kind == "map":
            cut = next((i for i, p in enumerate(prims) if p.per_item), len(prims))
            shared = prims[:cut]
            if shared:
                groups.append(PrefixGroup("", (node,), shared, fan_out=True, together=True))
    return groups


def _reason(group: PrefixGroup) -> str:
    what = " + ".join(p.describe() for p in group.segments)
    who = f"each element of {group.nodes[0]}" if group.fan_out else ", ".join(group.nodes)
    how = (
        "reach the engine together: prefilled once (in-batch prefix wait)"
        if group.together
        else "start at different times: later ones may hit the prefix cache"
    )
    return f"{group.id}: {who} share {group.num_segments} leading segment(s) {what}; {how}"


def prefix_sharing(graph: nx.DiGraph) -> nx.DiGraph:
    g = graph.copy()
    prefixes = {n: leading_prefill(lower(g, n)) for n in sorted(g)}
    prefixes = {n: p for n, p in prefixes.items() if p}
    groups = tuple(
        replace(group, id=f"P{i}") for i, group in enumerate(_groups(g, prefixes), start=1)
    )
    annotate_graph(g, SharedPrefixes(groups))
    return recorded(g, NAME, [_reason(group) for group in groups])
