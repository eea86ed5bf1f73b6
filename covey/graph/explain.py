"""`explain()`: what the runtime and the engine will do with a plan, like SQL EXPLAIN.

Each line states behaviour the code has, and says which part does it:
- the runtime (`covey.runtime.executor`) starts a node as soon as the nodes it reads from
  finish, so LLM calls with the same dependencies reach the engine in one event-loop turn
  and share its batches, and a fan-out sends all its elements at once;
- prefill-ahead (`covey.runtime.prefill_ahead`, with an engine that can prefill) pins each
  call's leading static segments once per app and, while a call waits, prefills its
  leading segments already known;
- the engine's scheduler admits requests by priority and shares common prompt starts in
  whole KV blocks: at once through its in-batch prefix wait when the calls arrive
  together, else through its prefix cache while the blocks stay cached
  (`covey.graph.shared_prefixes` finds where).
Given the engine's capabilities (`Runtime.explain`), it ends with what that engine turns
off: a remote OpenAI-compatible backend has no KV access, so prefill ahead, pins, chunk
reuse and constrained choices are off, and saying so is part of the plan.
"""

from __future__ import annotations

from covey.graph.control_explain import branch_prefill_note, control_flow, guard_note
from covey.graph.ir import Retrieve
from covey.graph.lowering import known_prefix
from covey.graph.plan import NodePlan, Plan, signature
from covey.graph.shared_prefixes import PrefixGroup, sent_together, shared_prefixes
from covey.graph.types import type_name
from covey.llm_backend.engine_client import EngineCapabilities


def _header(plan: Plan) -> list[str]:
    outs = ", ".join(f"{n}: {type_name(v.type)}" for n, v in plan.outputs.items())
    return [
        f"EXPLAIN app {plan.app!r}",
        f"  inputs:  {signature(plan.inputs) or 'none'}",
        f"  outputs: {outs}  (awaited: {', '.join(plan.awaited)})",
    ]


def _retrieval(op: Retrieve) -> str:
    k = "the retriever's own k" if op.k is None else f"k={op.k} (overrides the retriever's)"
    mode = (
        "the retriever's own mode"
        if op.mode is None
        else f"mode={op.mode} (overrides the retriever's)"
    )
    return f"; index {op.index!r}, {k}, {mode}"


def _nodes(plan: Plan) -> list[str]:
    lines = ["nodes (the runtime starts each one as soon as the nodes it reads from finish):"]
    for node in plan.nodes.values():
        when = f"after {', '.join(node.deps)}" if node.deps else "at start"
        extra = _retrieval(node.op) if isinstance(node.op, Retrieve) else ""
        extra += guard_note(node)
        lines.append(f"  {node.name} [{node.kind}]: {when}{extra}")
    return lines


def _peers(plan: Plan, node: NodePlan) -> list[str]:
    """The other LLM calls the runtime sends to the engine with `node`."""
    return [n.name for n in plan.llm_calls() if n is not node and sent_together(n, node)]


def _call(plan: Plan, node: NodePlan) -> list[str]:
    head = f"  {node.name}: priority {node.priority}"
    if node.kind == "map":
        head += ", one request per element, all sent together"
    peers = _peers(plan, node)
    if peers:
        head += f", sent with {', '.join(peers)}"
    lines = [head]
    pinned = sum(p.pin for p in node.primitives)
    if pinned:
        lines.append(f"    prefill-ahead pins its first {pinned} static segment(s) once per app")
    if node.deps and node.guard:
        lines.append(branch_prefill_note(node))
    elif node.deps:
        known = known_prefix(node.primitives, plan.inputs)
        lines.append(
            f"    prefill-ahead, while it waits for {', '.join(node.deps)}: its leading known "
            f"segments ({known} at run start), more as upstream outputs arrive"
        )
    return lines + [f"    {p.describe()}" for p in node.primitives]


def _calls(plan: Plan) -> list[str]:
    calls = plan.llm_calls()
    if not calls:
        return []
    lines = ["llm calls (sent to the engine when they start; lower priority is scheduled sooner):"]
    for node in calls:
        lines += _call(plan, node)
    return lines


def _how(plan: Plan, group: PrefixGroup) -> list[str]:
    if group.together:
        how = "sent together: the engine's in-batch prefix wait prefills the common blocks once"
    else:
        how = "sent at different times: later ones reuse it only from the engine's prefix cache"
    lines = [f"      {how}"]
    n = group.num_segments
    if all(all(p.pin for p in plan.nodes[name].primitives[:n]) for name in group.nodes):
        lines.append(
            "      all pinned static text: every call finds it cached unless requests needed "
            "the room"
        )
    return lines


def _prefixes(plan: Plan) -> list[str]:
    groups = shared_prefixes(plan)
    if not groups:
        return ["shared prefixes: none"]
    lines = ["shared prefixes (shared by the engine, in whole KV blocks of tokens):"]
    for g in groups:
        who = f"elements of {g.nodes[0]}" if g.fan_out else ", ".join(g.nodes)
        segs = " + ".join(p.describe() for p in g.segments)
        lines.append(f"  {g.id}: {who} share {g.num_segments} segment(s): {segs}")
        lines += _how(plan, g)
    return lines


def _passes(plan: Plan) -> list[str]:
    lines = ["passes:"]
    for record in plan.passes:
        lines.append(f"  {record.name}: {'fired' if record.fired else 'no change'}")
        lines += [f"    - {r}" for r in record.reasons]
    return lines


def _engine(plan: Plan, caps: EngineCapabilities, name: str) -> list[str]:
    """What the plan above relies on that this engine does not offer."""
    off = []
    if not caps.prefill:
        pins = sum(p.pin for n in plan.llm_calls() for p in n.primitives)
        early = sum(bool(n.deps) for n in plan.llm_calls())
        off.append(
            f"prefill: off; prefill-ahead is skipped ({pins} pinned static segment(s), "
            f"{early} call(s) with early prefill in this plan)"
        )
    if not caps.segments:
        off.append(
            "segments: off; prompts are sent as plain text, so retrieved chunks get no "
            "chunk-aware KV reuse (shared prefixes still depend on the engine's own cache)"
        )
    if not caps.chunks:
        off.append("chunks: off; no chunk KV store, chunks' KV is computed in every prompt")
    if not caps.choices:
        uses = [n.name for n in plan.llm_calls() if any(p.choices for p in n.primitives)]
        fails = f"; {', '.join(uses)} will fail (NotSupportedError)" if uses else ""
        off.append(f"choices: off; gens cannot be constrained to choices{fails}")
    if not caps.pause:
        off.append("pause: off; requests cannot be held across tool calls")
    if not off:
        return [f"engine {name}: every feature on"]
    return [f"engine {name}, features off:"] + [f"  {line}" for line in off]


def explain(
    plan: Plan, capabilities: EngineCapabilities | None = None, engine_name: str = "engine"
) -> str:
    """The plan as text; with an engine's `capabilities`, also what that engine turns off."""
    parts = [_header(plan), _nodes(plan), control_flow(plan), _calls(plan), _prefixes(plan)]
    parts.append(_passes(plan))
    if capabilities is not None:
        parts.append(_engine(plan, capabilities, engine_name))
    return "\n".join(line for part in parts for line in part)
