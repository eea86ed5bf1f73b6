"""Definition-time checks of a whole app graph: cycles and outputs nobody consumes.

Unconsumed outputs warn rather than fail: the graph still runs, and the pruning pass drops
nodes none of whose outputs reach an app output (tools excepted, for their side effects).
A gen followed by another gen in the same template counts as consumed: the later gen
reads it (a plan, a reasoning step).
"""

from __future__ import annotations

import warnings

import networkx as nx

from covey.errors import CycleError, GraphError, UnusedOutputWarning
from covey.graph.ir import Var, llm_template
from covey.graph.scopes import check_scopes


def _check_cycles(graph: nx.DiGraph, app: str) -> None:
    if nx.is_directed_acyclic_graph(graph):
        return
    cycle = nx.find_cycle(graph)
    path = " -> ".join([u for u, _ in cycle] + [cycle[0][0]])
    carried = ", ".join(v.name for u, w in cycle for v, _ in graph.edges[u, w].get("vars", ()))
    raise CycleError(
        f"app {app!r}: cycle {path} (through {carried or 'no variables'}); a node cannot "
        "depend on its own output: for a bounded loop use cg.loop(body, until=..., max_iters=N)"
    )


def _consumed(graph: nx.DiGraph) -> set[str]:
    used = {v.name for v in graph.graph["outputs"].values()}
    for node, data in graph.nodes(data=True):
        used |= {a.name for a in data["args"].values() if isinstance(a, Var)}
        template = llm_template(data["op"])
        if template is not None:
            used |= {f"{node}.{g.name}" for g in template.gens[:-1]}
    return used


def validate_graph(graph: nx.DiGraph) -> None:
    """Raise on what cannot run, warn on what is likely a mistake; mutates nothing."""
    app = graph.graph["app"]
    if not graph.graph["outputs"]:
        raise GraphError(f"app {app!r}: returns no variables; return a variable or a dict of them")
    for name, var in graph.graph["outputs"].items():
        if var.node is not None and var.node not in graph:
            raise GraphError(f"app {app!r}: output {name!r} comes from unknown node {var.node!r}")
    _check_cycles(graph, app)
    check_scopes(graph)
    used = _consumed(graph)
    for node, data in graph.nodes(data=True):
        optional = getattr(data["op"], "optional_outputs", ())  # e.g. a loop's iterations
        unused = [
            o for o in data["op"].outputs if f"{node}.{o}" not in used and o not in optional
        ]
        dead = len(unused) == len(data["op"].outputs) and data["op"].kind != "tool"
        for output in unused:
            warnings.warn(
                f"app {app!r}, node {node!r}: output {output!r} is never consumed; use it, "
                "return it from the app, or remove it" + (" (the node is pruned)" if dead else ""),
                UnusedOutputWarning,
                stacklevel=3,
            )
