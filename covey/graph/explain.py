"""`explain()`: the optimized plan as text, like SQL EXPLAIN."""

from __future__ import annotations

from covey.graph.plan import Plan, signature
from covey.graph.types import type_name


def _header(plan: Plan) -> list[str]:
    outs = ", ".join(f"{n}: {type_name(v.type)}" for n, v in plan.outputs.items())
    return [
        f"EXPLAIN app {plan.app!r}",
        f"  inputs:  {signature(plan.inputs) or 'none'}",
        f"  outputs: {outs}  (awaited: {', '.join(plan.awaited)})",
    ]


def _passes(plan: Plan) -> list[str]:
    lines = ["passes:"]
    for record in plan.passes:
        lines.append(f"  {record.name}: {'fired' if record.fired else 'no change'}")
        lines += [f"    - {r}" for r in record.reasons]
    return lines


def _stages(plan: Plan) -> list[str]:
    lines = ["stages (nodes in one stage run in parallel):"]
    for i, stage in enumerate(plan.stages):
        nodes = ", ".join(f"{n} [{plan.nodes[n].kind}]" for n in stage)
        tag = "  (parallel)" if len(stage) > 1 else ""
        lines.append(f"  {i}: {nodes}{tag}")
    return lines


def _calls(plan: Plan) -> list[str]:
    lines = ["llm calls:"]
    for node in plan.llm_calls():
        extra = [f"batch {node.batch_group}"] if node.batch_group else []
        extra += [f"prefix {g}" for g in node.prefix_groups]
        suffix = f"  {', '.join(extra)}" if extra else ""
        crit = ", critical path" if node.critical else ""
        lines.append(
            f"  {node.name}: priority {node.priority} ({node.objective}{crit}), "
            f"stage {node.stage}{suffix}"
        )
        lines += [f"    {p.describe()}" for p in node.primitives]
    return lines if len(lines) > 1 else []


def _prefixes(plan: Plan) -> list[str]:
    lines = ["shared prefixes:"]
    for g in plan.prefix_groups:
        who = f"elements of {g.nodes[0]}" if g.fan_out else ", ".join(g.nodes)
        segs = " + ".join(p.describe() for p in g.segments)
        lines.append(f"  {g.id}: {who} share {g.num_segments} segment(s): {segs}")
    return lines if len(lines) > 1 else ["shared prefixes: none"]


def explain(plan: Plan) -> str:
    parts = [_header(plan), _stages(plan), _calls(plan), _prefixes(plan), _passes(plan)]
    return "\n".join(line for part in parts for line in part)
