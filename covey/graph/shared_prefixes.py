"""Which LLM calls of a plan share a prompt start, and how the engine shares it.

An analysis for `explain()`, computed on demand from each call's primitives and deps: the
Plan carries none of it, because nothing in the runtime acts on it. The sharing happens
in the engine. The runtime hands every call that became ready in the same event-loop
turn to the engine together (`sent_together`: calls with the same dependencies; the
elements of one fan-out); the scheduler's in-batch prefix wait then makes a request whose
next KV block another running request is computing wait one step and reuse that block,
so the common start is prefilled once (SGLang's in-batch prefix caching, Parrot's context
fork). A call that starts later can only find the prefix in the engine's prefix cache.
Sharing is in whole KV blocks of tokens, found by the engine on the exact tokens; this
reports it on the template segments.

Two leading segments are alike when they are the same static text in the same role, or
the same variable in the same place. Static text that differs only after a long common
start (system prompts with a different last line) shares that start as a partial
segment. Each element of a fan-out shares the segments before its per-element input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from covey.graph.control_ops import exclusive
from covey.graph.lowering import Primitive, leading_prefill
from covey.graph.plan import NodePlan, Plan

# Shorter common starts of differing static text are not worth reporting.
MIN_PARTIAL_CHARS = 32


@dataclass(frozen=True)
class PrefixGroup:
    """LLM calls whose prompts start with the same `segments`, as the engine will share them.

    `together`: the calls become ready in the same event-loop turn (same dependencies, or the
    elements of one fan-out, `fan_out`), so they reach the engine together and its in-batch
    prefix wait prefills the shared blocks once. Otherwise a later call can only find the
    prefix in the engine's prefix cache, if it is still there.
    """

    id: str
    nodes: tuple[str, ...]
    segments: tuple[Primitive, ...]
    fan_out: bool = False
    together: bool = False

    @property
    def num_segments(self) -> int:
        return len(self.segments)


def sent_together(a: NodePlan, b: NodePlan) -> bool:
    """Whether the runtime hands `a` and `b` to the engine in the same event-loop turn: it
    starts a node as soon as its deps finish, so nodes with the same deps start together
    (unless they are in different branches of a route: then only one of them runs)."""
    return a.deps == b.deps and not exclusive(a.guard, b.guard)


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
                pin = all(p.pin for p in column)
                shared.append(replace(column[0], text=text, pin=pin))
        break
    return tuple(shared)


def _groups(plan: Plan, prefixes: dict[str, tuple[Primitive, ...]]) -> list[PrefixGroup]:
    buckets: dict[tuple, list[str]] = {}
    for node, prims in prefixes.items():
        if not prims[0].per_item:
            buckets.setdefault(_bucket(prims[0], node), []).append(node)
    groups = []
    for nodes in buckets.values():
        if len(nodes) > 1:
            shared = _common([prefixes[n] for n in nodes], nodes)
            first = plan.nodes[nodes[0]]
            together = all(sent_together(first, plan.nodes[n]) for n in nodes[1:])
            groups.append(PrefixGroup("", tuple(nodes), shared, together=together))
    for node, prims in prefixes.items():
        if plan.nodes[node].kind == "map":
            cut = next((i for i, p in enumerate(prims) if p.per_item), len(prims))
            if cut:
                groups.append(PrefixGroup("", (node,), prims[:cut], fan_out=True, together=True))
    return groups


def shared_prefixes(plan: Plan) -> tuple[PrefixGroup, ...]:
    """Every group of the plan's LLM calls with a common prompt start, numbered P1, P2, ...
    in the order of the calls' names; empty when no two prompts (or fan-out elements) share
    a start."""
    prefixes = {n.name: leading_prefill(n.primitives) for n in plan.llm_calls()}
    prefixes = {n: prefixes[n] for n in sorted(prefixes) if prefixes[n]}
    return tuple(
        replace(group, id=f"P{i}") for i, group in enumerate(_groups(plan, prefixes), start=1)
    )
