"""Pass 3: lower each LLM call to per-segment prefill and decode primitives.

A segment is `early` when it and every segment before it are known when the request
arrives (static text, literals, request inputs): the runtime prefills it while upstream
nodes (retrieval, other calls) still run (Teola partial prefill), and grows that prefix as
upstream outputs arrive (`covey.runtime.prefill_ahead`). Only a prefix can be
prefilled ahead, because a token's KV depends on every token before it. The leading run
of static segments is the same for every request: it is pinned once per app.
"""

from __future__ import annotations

from dataclasses import replace

import networkx as nx

from covey.graph.lowering import Primitive, lower
from covey.graph.passes.record import recorded

NAME = "prefill_decomposition"


def _mark(prims: tuple[Primitive, ...]) -> tuple[Primitive, ...]:
    out, early, pin = [], True, True
    for p in prims:
        known = p.op == "prefill" and (p.kind == "static" or (p.source is None and not p.per_item))
        early = early and known
        pin = pin and early and p.kind == "static"
        out.append(replace(p, early=early, pin=pin) if p.op == "prefill" else p)
    return tuple(out)


def prefill_decomposition(graph: nx.DiGraph) -> nx.DiGraph:
    g = graph.copy()
    reasons = []
    for node in sorted(g):
        prims = _mark(lower(g, node))
        g.nodes[node]["primitives"] = prims
        if not prims:
            continue
        kinds = ", ".join(p.kind for p in prims if p.op == "prefill")
        reasons.append(f"{node}: {len(prims)} primitives; segments {kinds}")
        early = [p for p in prims if p.early]
        if early and any(p.op == "prefill" and not p.early for p in prims):
            reasons.append(f"{node}: prefill {len(early)} segment(s) early, before its inputs")
        pinned = sum(p.pin for p in prims)
        if pinned:
            reasons.append(f"{node}: pin {pinned} static segment(s) once per app")
    return recorded(g, NAME, reasons)
