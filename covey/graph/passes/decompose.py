"""Pass 2: lower each LLM call to per-segment prefill and decode primitives, and mark the
leading static ones to pin.

What this decides, the runtime's prefill-ahead (`covey.runtime.prefill_ahead`) acts on:
- `pin`: a call's leading static segments are the same for every request, so at each
  run's start prefill-ahead prefills them once per app and pins them in the engine's
  prefix cache;
- the per-segment split itself: while a call waits for upstream nodes, prefill-ahead
  prefills its leading segments already known (`Primitive.known`: static text and request
  inputs at once, an upstream output when its node finishes), so only the rest is left
  when it starts (Teola partial prefill). Only a prefix can be prefilled ahead, because a
  token's KV depends on every token before it.
"""

from __future__ import annotations

from dataclasses import replace

import networkx as nx

from covey.graph.annotations import Lowered, annotate
from covey.graph.control_ops import describe_guard, guard_of
from covey.graph.lowering import Primitive, known_prefix, lower
from covey.graph.passes.record import recorded

NAME = "prefill_decomposition"


def _pin_leading_static(prims: tuple[Primitive, ...]) -> tuple[Primitive, ...]:
    out, pin = [], True
    for p in prims:
        pin = pin and p.op == "prefill" and p.kind == "static"
        out.append(replace(p, pin=True) if pin else p)
    return tuple(out)


def prefill_decomposition(graph: nx.DiGraph) -> nx.DiGraph:
    g = graph.copy()
    inputs = set(g.graph["inputs"])
    reasons = []
    for node in sorted(g):
        prims = _pin_leading_static(lower(g, node))
        annotate(g, node, Lowered(prims))
        if not prims:
            continue
        kinds = ", ".join(p.kind or "" for p in prims if p.op == "prefill")
        reasons.append(f"{node}: {len(prims)} primitives; segments {kinds}")
        known = known_prefix(prims, inputs)
        waits = sorted(g.predecessors(node))
        guard = guard_of(g, node)
        if guard:
            reasons.append(
                f"{node}: runs only when {describe_guard(guard)}; prefill-ahead prefills its "
                "known prefix past any pinned static start only once that holds"
            )
        elif known and waits:
            reasons.append(
                f"{node}: {known} leading segment(s) known at run start; prefill-ahead "
                f"prefills them while it waits for {', '.join(waits)}"
            )
        pinned = sum(p.pin for p in prims)
        if pinned:
            reasons.append(f"{node}: pin {pinned} leading static segment(s) once per app")
    return recorded(g, NAME, reasons)
