"""The IR of control flow: guards, and the four node ops a route or a loop adds.

covey keeps one flat DAG: a route's branches and a loop's (unrolled) iterations are ordinary
nodes carrying a `guard`, the conditions under which they run. The executor skips a node
whose guard is false, so only the taken branch runs, and everything else that reads a
plan (the optimizer passes, prefill-ahead, `explain()`, the exports) keeps working on the
same nodes and edges. A guard's conditions point at the node that decides them, and every
guarded node depends on it (by data or by a control edge), so it is decided before the node
could start.

- `RouteOp` ("route"): reads the routed variable, outputs `branch`, the label of the taken
  branch; a branch's nodes carry `Cond(route, "branch", label)`.
- `MergeOp` ("merge"): after a route, outputs the taken branch's values.
- `CheckOp` ("check"): a loop iteration's predicate; outputs `again`, whether the next
  iteration runs, whose nodes carry `Cond(check, "again", True)`.
- `LoopOp` ("loop"): after a loop, outputs the last iteration's values and `iterations`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import networkx as nx

ControlKind = Literal["route", "merge", "check", "loop"]
CONTROL_KINDS: tuple[str, ...] = ("route", "merge", "check", "loop")
DEFAULT_LABEL = "<default>"
GUARD_KEY = "guard"  # node attribute: tuple[Cond, ...], absent on unguarded nodes
CONTROL_KEY = "control"  # edge attribute: the label of a control edge (vars=() on it)


@dataclass(frozen=True)
class Cond:
    """Holds when output `output` of node `node` ran and equals `equals`."""

    node: str
    output: str
    equals: Any

    @property
    def var(self) -> str:
        return f"{self.node}.{self.output}"

    def holds(self, values: dict[str, Any]) -> bool | None:
        """True or False once decided; None while `node` has neither run nor been skipped
        (the caller knows which: a skipped node leaves no value, so it reads as False)."""
        if self.var not in values:
            return None
        return bool(values[self.var] == self.equals)

    def describe(self) -> str:
        if self.output == "again":
            return f"{self.node} says again"
        label = self.equals if self.equals == DEFAULT_LABEL else repr(self.equals)
        return f"{self.node} took {label}"


Guard = tuple[Cond, ...]


def guard_of(graph: nx.DiGraph, node: str) -> Guard:
    return graph.nodes[node].get(GUARD_KEY, ())


def exclusive(a: Guard, b: Guard) -> bool:
    """Whether two guards can never both hold: they need different outcomes of one decision."""
    decided = {(c.node, c.output): c.equals for c in a}
    return any(decided.get((c.node, c.output), c.equals) != c.equals for c in b)


def describe_guard(guard: Guard) -> str:
    """The last condition says it all: the node deciding it runs only under the earlier
    ones (a nested route is inside its branch, a loop check inside its iteration)."""
    return guard[-1].describe() if guard else "always"


def branch_label(key: Any) -> str:
    """How a branch key reads in the trace: a string as itself, anything else as repr."""
    return key if isinstance(key, str) else repr(key)


@dataclass(frozen=True)
class RouteOp:
    """Choose a branch by the value of input `on`: the first key equal to it, else the
    default branch (or an error at run time when there is none)."""

    on_type: Any
    keys: tuple[Any, ...]
    has_default: bool
    kind: ControlKind = "route"

    @property
    def labels(self) -> tuple[str, ...]:
        extra = (DEFAULT_LABEL,) if self.has_default else ()
        return tuple(branch_label(k) for k in self.keys) + extra

    @property
    def inputs(self) -> dict[str, Any]:
        return {"on": self.on_type}

    @property
    def outputs(self) -> dict[str, Any]:
        return {"branch": str}


def port(label: str | int, name: str) -> str:
    """The merge or loop input carrying output `name` of branch (or iteration) `label`."""
    return f"{label}:{name}"


# The loop input carrying an iteration's check decision. Output names are identifiers
# (`control_flow._outputs`), so no body output, not even one called `again`, can take it.
DECISION = "#again"


@dataclass(frozen=True)
class MergeOp:
    """The outputs of a route: input `branch` names the taken branch, and input
    `port(label, name)` carries that branch's output `name`."""

    route: str
    labels: tuple[str, ...]
    types: tuple[tuple[str, Any], ...]  # output name -> type, in order
    kind: ControlKind = "merge"

    @property
    def inputs(self) -> dict[str, Any]:
        ins: dict[str, Any] = {"branch": str}
        for label in self.labels:
            ins.update({port(label, name): t for name, t in self.types})
        return ins

    @property
    def outputs(self) -> dict[str, Any]:
        return dict(self.types)

    def port_guard(self, name: str) -> Guard:
        """The condition under which the value on input `name` exists. The label is what
        precedes the last colon: a key may contain colons, an output name cannot."""
        label = name.rsplit(":", 1)[0] if ":" in name else None
        return (Cond(self.route, "branch", label),) if label is not None else ()


@dataclass(frozen=True)
class CheckOp:
    """A loop's predicate over one iteration's outputs (bound by parameter name):
    `again` is whether another iteration runs (`until`: the predicate is false;
    `while`: it is true). The predicate must return a bool."""

    fn: Callable[..., Any]
    inputs: dict[str, Any]
    until: bool
    iteration: int
    kind: ControlKind = "check"

    @property
    def outputs(self) -> dict[str, Any]:
        return {"again": bool}


@dataclass(frozen=True)
class LoopOp:
    """The outputs of a bounded loop: the last iteration that ran, and how many ran.
    Input `port(k, name)` carries iteration k's output `name`; `port(k, DECISION)` its
    check's decision (present only if iteration k ran)."""

    max_iters: int
    checks: tuple[str, ...]  # the check node of each iteration
    types: tuple[tuple[str, Any], ...]
    members: tuple[tuple[str, ...], ...] = ()  # the nodes of each iteration, for explain()
    kind: ControlKind = "loop"
    optional_outputs: ClassVar[tuple[str, ...]] = ("iterations",)  # unread: no warning

    @property
    def inputs(self) -> dict[str, Any]:
        ins: dict[str, Any] = {}
        for k in range(1, self.max_iters + 1):
            ins.update({port(k, name): t for name, t in self.types})
            ins[port(k, DECISION)] = bool
        return ins

    @property
    def outputs(self) -> dict[str, Any]:
        return {**dict(self.types), "iterations": int}

    def port_guard(self, name: str) -> Guard:
        """Iteration k's values exist when every check before it said again."""
        k = int(name.split(":", 1)[0])
        return iteration_guard(self.checks[: k - 1])


def iteration_guard(checks: tuple[str, ...] | list[str]) -> Guard:
    """The conditions of the iteration after `checks`: each of them said again."""
    return tuple(Cond(check, "again", True) for check in checks)


ControlOp = RouteOp | MergeOp | CheckOp | LoopOp
