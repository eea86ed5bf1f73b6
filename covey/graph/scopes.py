"""Definition-time check that every variable is read only where it exists.

A node inside a route branch or a loop iteration runs only when its guard holds, so its
outputs exist only then. A node may read a variable only if the variable's producer runs
whenever the reader does: the producer's guard is part of the reader's. The merge after a
route and the result of a loop read each branch's (iteration's) outputs on their own input,
under that branch's condition. An app output must exist on every run, so it comes from an
unguarded node: the route's or loop's result, not a node inside a branch.
"""

from __future__ import annotations

import networkx as nx

from covey.errors import GraphError
from covey.graph.control_ops import Guard, describe_guard, guard_of
from covey.graph.ir import Var

_FIX = (
    "return it from the branch (or loop body) and read the route's (loop's) output instead"
)


def _port_guard(op: object, port: str) -> Guard:
    extra = getattr(op, "port_guard", None)
    return extra(port) if extra is not None else ()


def check_scopes(graph: nx.DiGraph) -> None:
    """Raise GraphError where a node, or the app's output, reads a variable that exists
    only under conditions the reader does not run under."""
    app = graph.graph["app"]
    for node, data in graph.nodes(data=True):
        reader = set(guard_of(graph, node))
        for port, arg in data["args"].items():
            if not isinstance(arg, Var) or arg.node is None or arg.node not in graph:
                continue
            missing = [
                c
                for c in guard_of(graph, arg.node)
                if c not in reader and c not in _port_guard(data["op"], port)
            ]
            if missing:
                raise GraphError(
                    f"app {app!r}, node {node!r}: input {port!r} reads {arg.name!r}, which "
                    f"exists only when {describe_guard(tuple(missing))}; {_FIX}"
                )
    for name, var in graph.graph["outputs"].items():
        if var.node is not None and var.node in graph and guard_of(graph, var.node):
            raise GraphError(
                f"app {app!r}: output {name!r} is {var.name!r}, which exists only when "
                f"{describe_guard(guard_of(graph, var.node))}; {_FIX}"
            )
