"""How `explain()` shows control flow: which nodes each route branch and loop iteration
holds, and what prefill-ahead does for a call that may not run.

Every branch is in the plan, but only the taken one runs (the trace marks the others
"skipped"). Prefill-ahead pins every call's leading static text once per app, whichever
branch a request takes, so a branch's static start is already cached when it is taken;
the rest of a branch's known prompt is prefilled only once the branch is taken, so an
untaken branch costs no per-request prefill.
"""

from __future__ import annotations

from covey.graph.control_ops import Cond, LoopOp, MergeOp, RouteOp, describe_guard
from covey.graph.ir import Var
from covey.graph.plan import NodePlan, Plan


def guard_note(node: NodePlan) -> str:
    """The tail of a node's line in explain(): when it runs."""
    return f"; only when {describe_guard(node.guard)}" if node.guard else ""


def branch_prefill_note(node: NodePlan) -> str:
    """What prefill-ahead does for a call in a branch or a later loop iteration."""
    return (
        f"    runs only when {describe_guard(node.guard)}: prefill-ahead prefills its known "
        "segments past the pin only once that holds (a call that never runs costs no prefill)"
    )


def _names(nodes: list[str]) -> str:
    return ", ".join(nodes) if nodes else "no nodes (returns a value)"


def _route(plan: Plan, node: NodePlan, op: RouteOp) -> list[str]:
    on = node.args["on"]
    what = on.name if isinstance(on, Var) else repr(on)
    lines = [f"  {node.name}: route on {what}; only the taken branch runs"]
    for label in op.labels:
        cond = Cond(node.name, "branch", label)
        members = [n.name for n in plan.nodes.values() if cond in n.guard]
        shown = label if label == "<default>" else repr(label)
        lines.append(f"    {shown} -> {_names(members)}")
    for merge in plan.nodes.values():
        if isinstance(merge.op, MergeOp) and merge.op.route == node.name:
            outs = ", ".join(name for name, _ in merge.op.types)
            lines.append(f"    then {merge.name}: the taken branch's {outs}")
    return lines


def _predicate(plan: Plan, op: LoopOp) -> str:
    check = plan.nodes.get(op.checks[0])
    if check is None:
        return "a predicate"
    fn = getattr(check.op, "fn", None)
    word = "until" if getattr(check.op, "until", True) else "while"
    params = ", ".join(getattr(check.op, "inputs", {}))
    return f"{word} {getattr(fn, '__name__', 'predicate')}({params})"


def _loop(plan: Plan, node: NodePlan, op: LoopOp) -> list[str]:
    lines = [
        f"  {node.name}: loop, at most {op.max_iters} iteration(s), {_predicate(plan, op)} "
        "(checked after each iteration)"
    ]
    for k, members in enumerate(op.members, start=1):
        present = [m for m in members if m in plan.nodes]
        when = "" if k == 1 else f" (if {op.checks[k - 2]} says again)"
        lines.append(f"    iteration {k}{when}: {_names(present)}")
    outs = ", ".join(name for name, _ in op.types)
    lines.append(f"    then {node.name}: the last iteration's {outs}, and iterations")
    return lines


def control_flow(plan: Plan) -> list[str]:
    """The explain() section on routes and loops; empty for an app without them."""
    lines: list[str] = []
    for node in plan.nodes.values():
        if isinstance(node.op, RouteOp):
            lines += _route(plan, node, node.op)
        elif isinstance(node.op, LoopOp):
            lines += _loop(plan, node, node.op)
    if not lines:
        return []
    head = "control flow (nodes of an untaken branch or iteration are skipped: no engine work)"
    return [head, *lines]
