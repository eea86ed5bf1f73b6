"""Control flow in the DSL: `route` (choose a branch by a variable's value) and `loop`
(repeat a sub-graph while a predicate holds, at most N times).

A Python `if` on a semantic variable cannot work (the app function runs once, at
definition, before any value exists; see `covey.graph.misuse`), so the branching is
wired instead, the way LangGraph's conditional edges and Haystack's ConditionalRouter map
an outcome to the next step, but in covey's style: a branch is a plain function that calls
nodes and returns their outputs, and the whole route is one expression whose value is the
taken branch's outputs.

    category = classify(ticket)                   # a gen with choices="hardware|billing|other"
    reply = cg.route(category, {
        "hardware": lambda: hardware_answer(ticket),
        "billing": lambda: billing_answer(ticket),
    }, default=lambda: "A person will get back to you.")

    out = cg.loop(attempt, init={"query": question}, until=knows, max_iters=2)
    out.answer, out.iterations

Both build ordinary guarded nodes (`covey.graph.control_ops`): every branch and every
iteration is in the graph, so the optimizer sees all of them (every branch's static prompt
start is pinned ahead), while the executor runs only the nodes whose guard holds. A loop is
unrolled `max_iters` times when the app is defined: iteration k runs only if the check of
every earlier iteration said "again"; its nodes are named `name@k`, so each iteration's
outputs are in the trace.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any

import networkx as nx

from covey.checks import as_int
from covey.errors import GraphError, TypeMismatchError, WiringError
from covey.graph.control_ops import (
    CONTROL_KEY,
    DECISION,
    DEFAULT_LABEL,
    CheckOp,
    Cond,
    LoopOp,
    MergeOp,
    RouteOp,
    branch_label,
    guard_of,
    iteration_guard,
    port,
)
from covey.graph.dsl import (
    Builder,
    Node,
    NodeOutputs,
    PyFunction,
    _result,
    bind,
    current_builder,
    signature_of,
)
from covey.graph.ir import Const, LLMCall, Var
from covey.graph.template import suggest
from covey.graph.types import compatible, type_name, value_fits

# A loop is unrolled when the app is defined; past this many iterations the graph (and
# explain()) would be mostly copies of the body, and an app that needs more is not a
# "retry a few times" loop.
MAX_ITERS = 16

Branch = Callable[[], Any]


def _scope(builder: Builder, cond: Cond, fn: Callable[[], Any], suffix: str = "") -> Any:
    """Call `fn` with `cond` added to the guard of every node it adds; then make each of
    those nodes wait for the node deciding `cond` (a control edge where no data edge
    already orders it)."""
    before = set(builder.graph)
    saved = builder.guard, builder.suffix
    builder.guard, builder.suffix = (*builder.guard, cond), builder.suffix + suffix
    try:
        result = fn()
    finally:
        builder.guard, builder.suffix = saved
    _order_after(builder.graph, set(builder.graph) - before, cond)
    return result


def _order_after(graph: nx.DiGraph, nodes: set[str], cond: Cond) -> None:
    label = "again" if cond.output == "again" else str(cond.equals)
    for node in nodes:
        ordered = any(
            p == cond.node or cond in guard_of(graph, p) for p in graph.predecessors(node)
        )
        if not ordered:
            graph.add_edge(cond.node, node, vars=(), **{CONTROL_KEY: label})
        elif graph.has_edge(cond.node, node):
            graph.edges[cond.node, node][CONTROL_KEY] = label


def _value_name(value: Any) -> str | None:
    return (value.output or value.name) if isinstance(value, Var) else None


def _outputs(where: str, result: Any, app: str) -> tuple[dict[str, Any], bool]:
    """A branch's or body's return as name -> Var or literal; True when it was one value."""
    if isinstance(result, NodeOutputs):
        return {v.output or v.name: v for v in result}, False
    if isinstance(result, dict):
        bad = [k for k in result if not isinstance(k, str)]
        if bad:
            raise GraphError(f"{where}: returned a dict with non-string keys {bad}")
        # the names become attributes (out.answer), and the merge and loop ports rely on
        # them having no ':' (see MergeOp.port_guard) and not being the loop's DECISION
        bad = [k for k in result if not k.isidentifier()]
        if bad:
            raise GraphError(
                f"{where}: output names are identifiers (they become attributes, out.name); "
                f"rename {', '.join(map(repr, bad))}"
            )
        for name, value in result.items():
            _check_value(f"{where}, output {name!r}", value, app)
        return dict(result), False
    _check_value(where, result, app)
    if result is None:
        raise GraphError(
            f"{where}: returned nothing; return a variable, a literal or a dict of them "
            "(a lambda returns its expression: lambda: answer(question))"
        )
    return {_value_name(result) or "result": result}, True


def _check_value(where: str, value: Any, app: str) -> None:
    if isinstance(value, NodeOutputs):
        raise WiringError(f"{where}: got several outputs of one node; pick one, e.g. out.answer")
    if isinstance(value, Var) and value.app != app:
        raise WiringError(f"{where}: variable {value.name!r} belongs to app {value.app!r}")


def _arg(value: Any) -> Var | Const:
    return value if isinstance(value, Var) else Const(value)


def _type(value: Any) -> Any:
    return value.type if isinstance(value, Var) else type(value)


def _union(types: list[Any]) -> Any:
    distinct: list[Any] = []
    for t in types:
        if t is Any:
            return Any
        if not any(compatible(t, d) and compatible(d, t) for d in distinct):
            distinct.append(t)
    return distinct[0] if len(distinct) == 1 else typing.Union[tuple(distinct)]  # noqa: UP007


def _check_no_params(where: str, fn: Any, what: str) -> None:
    if not callable(fn):
        raise GraphError(
            f"{where}: {what} must be a function that wires nodes and returns their outputs "
            f"(e.g. lambda: answer(question)), got {fn!r}"
        )
    if isinstance(fn, Node):
        required = [n for n in fn.op.inputs if n not in fn.defaults]
    else:
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            return
        required = [
            p.name
            for p in params
            if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
    if required:
        called = getattr(fn, "name", getattr(fn, "__name__", "f"))
        raise GraphError(
            f"{where}: {what} takes no arguments (it wires nodes over variables it can see), "
            f"but it needs {', '.join(required)}; wrap it: lambda: {called}"
            f"({', '.join(required)})"
        )


def _choices_of(var: Var, graph: nx.DiGraph) -> tuple[str, ...] | None:
    """The choices of the gen that produces `var`, if it is one with choices."""
    if var.node is None or var.node not in graph:
        return None
    op = graph.nodes[var.node]["op"]
    if not isinstance(op, LLMCall):
        return None
    gen = next((g for g in op.template.gens if g.name == var.output), None)
    return gen.choices if gen is not None else None


def _check_keys(
    where: str, on: Var, keys: list[Any], has_default: bool, graph: nx.DiGraph
) -> None:
    """Keys that fit the routed type, with distinct labels; with a gen's choices, keys
    among them and every choice covered (or a default)."""
    labels: dict[str, Any] = {}
    for key in keys:
        if isinstance(key, Var | NodeOutputs):
            # a Var is hashable, so it is a legal dict key, but it has no value until the
            # app runs and comparing it then raises the misuse error: refuse it here
            named = key.name if isinstance(key, Var) else "several outputs of one node"
            raise GraphError(
                f"{where}: branch keys are values known at definition, got the variable "
                f"{named!r}; to compare {on.name!r} with it, compute the test in a "
                "@cg.function and route on its result"
            )
        if not value_fits(key, on.type):
            raise TypeMismatchError(
                f"{where}: branch key {key!r} ({type(key).__name__}) can never equal "
                f"{on.name!r}, which is {type_name(on.type)}"
            )
        label = branch_label(key)
        if label == DEFAULT_LABEL:
            raise GraphError(
                f"{where}: the branch key {DEFAULT_LABEL!r} is reserved for the default "
                "branch; pass that branch as default= instead"
            )
        if label in labels:
            raise GraphError(f"{where}: branch keys {labels[label]!r} and {key!r} collide")
        labels[label] = key
    choices = _choices_of(on, graph)
    if choices is None:
        return
    for key in keys:
        if key not in choices:
            raise GraphError(
                f"{where}: branch {key!r} can never be taken: {on.name!r} is one of "
                f"{list(choices)}{suggest(str(key), choices)}"
            )
    missing = [c for c in choices if c not in keys]
    if missing and not has_default:
        raise GraphError(
            f"{where}: {on.name!r} may be {', '.join(repr(m) for m in missing)}, which no "
            "branch takes; add those branches or a default="
        )


def route(
    on: Var,
    branches: dict[Any, Branch],
    default: Branch | None = None,
    *,
    name: str = "route",
) -> Var | NodeOutputs:
    """Run the branch whose key equals the value of `on`, else `default`; only that
    branch's nodes run.

    `branches` maps each value to a function of no arguments that calls nodes (any:
    semantic functions, retrieve, tools, functions, a nested route or loop) and returns
    their outputs: a variable, a literal (`lambda: "no answer"`), or a dict of them. Every
    branch returns the same output names; the route returns them as one variable (when
    each branch returns one value) or as `NodeOutputs` whose values are the taken
    branch's. With no `default`, a value matching no key fails the run with a clear error.
    When `on` comes from a gen with `choices=`, keys outside the choices, or choices left
    without a branch and no default, are errors at definition.
    """
    builder = current_builder("cg.route")
    where = f"app {builder.app!r}, route {name!r}"
    if isinstance(on, NodeOutputs):
        raise WiringError(f"{where}: routes on one variable; pick one output, e.g. out.category")
    if not isinstance(on, Var):
        raise GraphError(
            f"{where}: routes on a semantic variable, got the literal {on!r}; with a value "
            "known at definition, call the branch directly"
        )
    if not isinstance(branches, dict) or not branches:
        raise GraphError(f"{where}: branches must be a non-empty dict of value -> function")
    keys = list(branches)
    _check_keys(where, on, keys, default is not None, builder.graph)
    fns = [branches[k] for k in keys] + ([default] if default is not None else [])
    op = RouteOp(on.type, tuple(keys), default is not None)
    for label, fn in zip(op.labels, fns):
        _check_no_params(where, fn, f"branch {label!r}")
    decision = builder.add(name, op, bind(where, op.inputs, {}, (on,), {}, builder.app))
    route_node = str(decision["branch"].node)
    results: dict[str, dict[str, Any]] = {}
    single = True
    for label, fn in zip(op.labels, fns):
        result = _scope(builder, Cond(route_node, "branch", label), fn)
        results[label], one = _outputs(f"{where}, branch {label!r}", result, builder.app)
        single = single and one
    names = _common_names(where, results, single)
    types = tuple((n, _union([_type(results[lb][n]) for lb in results])) for n in names)
    merge = MergeOp(route_node, op.labels, types)
    args: dict[str, Var | Const] = {"branch": decision["branch"]}
    for label, outs in results.items():
        args.update({port(label, n): _arg(outs[n]) for n in names})
    return _result(builder.add(f"{name}_merge", merge, args))


def _common_names(where: str, results: dict[str, dict[str, Any]], single: bool) -> list[str]:
    """The output names every branch returns; one value per branch merges into one output,
    named after the branches' variables when they agree, else `result`."""
    if single:
        named = {_value_name(v) for outs in results.values() for v in outs.values()}
        named.discard(None)
        name = named.pop() if len(named) == 1 else "result"
        for outs in results.values():
            (value,) = outs.values()
            outs.clear()
            outs[name] = value
        return [name]
    first_label, first = next(iter(results.items()))
    for label, outs in results.items():
        if set(outs) != set(first):
            raise GraphError(
                f"{where}: every branch must return the same outputs; branch {first_label!r} "
                f"returns {sorted(first)} but branch {label!r} returns {sorted(outs)}"
            )
    return list(first)


def _predicate(where: str, fn: Any) -> tuple[Callable[..., Any], dict[str, Any]]:
    """The Python callable and its inputs (name -> type) of a loop's until/while_: its
    parameters without a default (those with one keep it)."""
    if isinstance(fn, PyFunction):
        return fn.op.fn, {n: t for n, t in fn.op.inputs.items() if n not in fn.defaults}
    if isinstance(fn, Node):
        raise GraphError(
            f"{where}: the predicate is plain Python over the iteration's outputs (it runs "
            f"between iterations); {fn.name!r} is a {fn.label}: call it in the body, return "
            "its output, and test that output in the predicate"
        )
    if not callable(fn):
        raise GraphError(f"{where}: the predicate must be a function, got {fn!r}")
    inputs, defaults, _ = signature_of(fn, f"{where}, predicate", need_hints=False)
    inputs = {n: t for n, t in inputs.items() if n not in defaults}
    if not inputs:
        raise GraphError(
            f"{where}: the predicate takes no parameters; name the body outputs it tests, "
            "e.g. until=lambda answer: 'not sure' not in answer"
        )
    return fn, inputs


def _check_body(where: str, body: Any, init: dict[str, Any]) -> None:
    if not callable(body) or isinstance(body, Node):
        raise GraphError(
            f"{where}: the body must be a function that wires nodes and returns a dict of "
            f"outputs, got {body!r}"
        )
    try:
        params = inspect.signature(body).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    unknown = [k for k in init if k not in params]
    missing = [
        n for n, p in params.items() if p.default is p.empty and n not in init
    ]
    if unknown or missing:
        raise GraphError(
            f"{where}: the body's parameters ({', '.join(params) or 'none'}) are the loop "
            f"state and must match init ({', '.join(init) or 'none'})"
        )


def _check_max_iters(where: str, max_iters: Any) -> int:
    """The bound said as the docs say it ("1 to 16"), not as a half-open range."""
    number = as_int(f"{where}: max_iters", max_iters, error=GraphError)
    if not 1 <= number <= MAX_ITERS:
        raise GraphError(
            f"{where}: max_iters must be an integer from 1 to {MAX_ITERS} (loops are unrolled "
            f"when the app is defined, so they are for a few retries, not long iterations), "
            f"got {number}"
        )
    return number


def loop(
    body: Callable[..., Any],
    init: dict[str, Any] | None = None,
    *,
    until: Callable[..., bool] | None = None,
    while_: Callable[..., bool] | None = None,
    max_iters: int,
    name: str = "loop",
) -> NodeOutputs:
    """Run `body` at most `max_iters` times: stop after an iteration whose outputs make
    `until` true (or `while_` false).

    `body(**state)` wires nodes and returns a dict of outputs (variables or literals). The
    state starts as `init` (name -> variable or literal) and each iteration's outputs of
    the same names become the next one's state, so `init`'s names must be parameters of
    `body` and outputs of it. The predicate is plain Python run between iterations: its
    parameters name body outputs and receive their values; it returns a bool. Pass a
    `@cg.function` to have its type hints checked. Returns `NodeOutputs` with the body's
    outputs from the last iteration that ran and `iterations`, how many ran. Each
    iteration's nodes are named `node@k` and the checks `{name}_until@k` (or `_while@k`),
    so the trace shows every iteration's outputs and decisions. The predicate runs after
    every iteration, the last one included: its decision there changes nothing, but the
    trace then says whether the loop converged or stopped at `max_iters`.
    """
    builder = current_builder("cg.loop")
    where = f"app {builder.app!r}, loop {name!r}"
    if (until is None) == (while_ is None):
        raise GraphError(f"{where}: give exactly one of until= or while_= (the predicate)")
    max_iters = _check_max_iters(where, max_iters)
    init = dict(init or {})
    if any(not isinstance(k, str) for k in init):
        raise GraphError(f"{where}: init maps state names (str) to variables or literals")
    _check_body(where, body, init)
    fn, pred_inputs = _predicate(where, until if until is not None else while_)
    word = "until" if until is not None else "while"
    state = dict(init)
    checks: list[str] = []
    decisions: list[Var] = []
    iterations: list[dict[str, Any]] = []
    members: list[tuple[str, ...]] = []
    for k in range(1, max_iters + 1):
        here = f"{where}, iteration {k}"
        before = set(builder.graph)
        outs = _iteration(builder, checks, k, lambda s=state: body(**s), here)
        _check_iteration(here, outs, iterations, init, pred_inputs)
        check = CheckOp(fn, pred_inputs, until is not None, k)
        bound = bind(
            f"{here}, {word}", pred_inputs, {}, (), {p: outs[p] for p in pred_inputs}, builder.app
        )
        decided = _add_check(builder, f"{name}_{word}", check, bound, checks)
        checks.append(str(decided.node))
        members.append(tuple(n for n in builder.graph if n not in before))
        decisions.append(decided)
        iterations.append(outs)
        state = {n: outs[n] for n in init}
    names = list(iterations[0])
    if "iterations" in names:
        raise GraphError(f"{where}: the body returns 'iterations', which the loop adds; rename it")
    types = tuple((n, _union([_type(outs[n]) for outs in iterations])) for n in names)
    op = LoopOp(max_iters, tuple(checks), types, tuple(members))
    args: dict[str, Var | Const] = {}
    for k, outs in enumerate(iterations, start=1):
        args.update({port(k, n): _arg(outs[n]) for n in names})
        args[port(k, DECISION)] = decisions[k - 1]
    out = builder.add(name, op, args)
    return NodeOutputs(out)


def _add_check(
    builder: Builder, base: str, check: CheckOp, bound: dict[str, Any], checks: list[str]
) -> Var:
    """Add iteration k's check under iteration k's guard, after the check before it."""
    saved = builder.guard, builder.suffix
    builder.guard = (*builder.guard, *iteration_guard(checks))
    builder.suffix += f"@{check.iteration}"
    try:
        decided = builder.add(base, check, bound)["again"]
    finally:
        builder.guard, builder.suffix = saved
    if checks:
        _order_after(builder.graph, {str(decided.node)}, Cond(checks[-1], "again", True))
    return decided


def _iteration(
    builder: Builder, checks: list[str], k: int, call: Callable[[], Any], where: str
) -> dict[str, Any]:
    """Trace iteration `k` of a loop: it runs when every earlier check said again."""
    outer, saved_suffix = builder.guard, builder.suffix
    builder.guard = (*outer, *iteration_guard(checks[:-1]))
    try:
        if checks:
            result = _scope(builder, Cond(checks[-1], "again", True), call, f"@{k}")
        else:
            builder.suffix += f"@{k}"
            result = call()
    finally:
        builder.guard, builder.suffix = outer, saved_suffix
    outs, _ = _outputs(where, result, builder.app)
    return outs


def _check_iteration(
    where: str,
    outs: dict[str, Any],
    earlier: list[dict[str, Any]],
    init: dict[str, Any],
    pred_inputs: dict[str, Any],
) -> None:
    if earlier and set(outs) != set(earlier[0]):
        raise GraphError(
            f"{where}: returned {sorted(outs)} but iteration 1 returned {sorted(earlier[0])}"
        )
    missing = [n for n in init if n not in outs]
    if missing:
        raise GraphError(
            f"{where}: the body must return the next state too; it does not return "
            f"{', '.join(missing)} (returns {', '.join(outs) or 'nothing'})"
        )
    for p in pred_inputs:
        if p not in outs:
            raise GraphError(
                f"{where}: the predicate's parameter {p!r} is not a body output"
                f"{suggest(p, list(outs))} (outputs: {', '.join(outs)})"
            )
