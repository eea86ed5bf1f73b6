"""Running control flow: skip the nodes whose guard is false, and run the route, merge,
check and loop nodes (`covey.graph.control_ops`).

A node's guard is decided before it could start (it depends on every node deciding it),
so when its dependencies are done the executor asks `guard_holds`: a false guard marks the
node skipped in the trace, with no outputs and no engine request, and a node that reads
it is skipped too (it carries the same conditions). A skipped decision leaves no value,
which reads as false, so nothing inside an untaken branch or a loop iteration that never
came can run.
"""

from __future__ import annotations

from typing import Any

from covey.errors import RuntimeExecutionError
from covey.graph.control_ops import (
    CONTROL_KINDS,
    DECISION,
    DEFAULT_LABEL,
    CheckOp,
    Guard,
    LoopOp,
    MergeOp,
    RouteOp,
    branch_label,
    port,
)
from covey.graph.ir import Var
from covey.graph.plan import NodePlan
from covey.runtime.nodes import NodeEnv, call_python
from covey.runtime.trace import Trace


def guard_holds(guard: Guard, values: dict[str, Any]) -> bool:
    """Whether a node whose dependencies are done runs (an undecided condition, left by a
    skipped decision, does not hold)."""
    return all(c.holds(values) for c in guard)


def guard_open(guard: Guard, values: dict[str, Any]) -> bool:
    """Whether a node still waiting is known to run: every condition decided and true.
    Prefill-ahead uses it to prefill only the taken branch's prompts past their pins."""
    return all(c.holds(values) is True for c in guard)


def skip_closed(
    pending: dict[str, NodePlan], done: set[str], values: dict[str, Any], trace: Trace
) -> None:
    """Move every pending node whose deps are done and whose guard is false to `done`,
    as 'skipped' in the trace, until none is left (skipping one can ready another)."""
    while True:
        closed = [
            n
            for n in pending.values()
            if n.guard and set(n.deps) <= done and not guard_holds(n.guard, values)
        ]
        if not closed:
            return
        for node in closed:
            del pending[node.name]
            trace.start(node.name, node.kind)
            trace.finish(node.name, "skipped")
            done.add(node.name)


def is_control(node: NodePlan) -> bool:
    return node.kind in CONTROL_KINDS


def _value(env: NodeEnv, node: NodePlan, name: str) -> Any:
    arg = node.args[name]
    return env.values[arg.name] if isinstance(arg, Var) else arg.value


def _route(node: NodePlan, op: RouteOp, value: Any) -> dict[str, Any]:
    for key in op.keys:
        if value == key:
            return {"branch": branch_label(key)}
    if op.has_default:
        return {"branch": DEFAULT_LABEL}
    keys = ", ".join(repr(k) for k in op.keys)
    raise RuntimeExecutionError(
        f"route {node.name!r}: value {value!r} matches no branch ({keys}) and there is no "
        "default; add default= to the route"
    )


def _numpy_bool(value: Any) -> bool:
    """Whether `value` is a numpy bool (`score > 0.5` on a numpy score), which is no `bool`
    subclass but is exactly True or False; checked by name so numpy need not be imported."""
    kind = type(value)
    return kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_")


async def _check(env: NodeEnv, node: NodePlan, op: CheckOp) -> dict[str, Any]:
    kwargs = {p: _value(env, node, p) for p in op.inputs}
    result = await call_python(op.fn, kwargs)
    if _numpy_bool(result):
        result = bool(result)
    if not isinstance(result, bool):
        word = "until" if op.until else "while_"
        raise RuntimeExecutionError(
            f"loop check {node.name!r}: the {word} predicate returned {result!r} "
            f"({type(result).__name__}); return True or False"
        )
    return {"again": not result if op.until else result}


def _loop(env: NodeEnv, node: NodePlan, op: LoopOp) -> dict[str, Any]:
    """The last iteration that ran: iteration k+1 ran when check k said again."""
    last = 1
    while last < op.max_iters:
        again = node.args[port(last, DECISION)]
        if not (isinstance(again, Var) and env.values.get(again.name) is True):
            break
        last += 1
    outputs = {name: _value(env, node, port(last, name)) for name, _ in op.types}
    return {**outputs, "iterations": last}


async def run_control(env: NodeEnv, node: NodePlan) -> dict[str, Any]:
    """Run a route, merge, check or loop node; they read only the inputs that exist."""
    op = node.op
    if isinstance(op, RouteOp):
        return _route(node, op, _value(env, node, "on"))
    if isinstance(op, MergeOp):
        taken = _value(env, node, "branch")
        return {name: _value(env, node, port(taken, name)) for name, _ in op.types}
    if isinstance(op, CheckOp):
        return await _check(env, node, op)
    if isinstance(op, LoopOp):
        return _loop(env, node, op)
    raise RuntimeExecutionError(f"node {node.name!r} is not a control-flow node")
