"""Mermaid and DOT text of an app graph, for docs, notebooks and `dot -Tsvg`.

Control flow (`covey.graph.control_ops`): a route is a diamond, a loop check a hexagon;
the nodes of each route branch or loop iteration are boxed together (a Mermaid subgraph, a
DOT cluster) under the condition they run on, and a control edge (ordering without data)
is dashed, labelled with the branch it opens.
"""

from __future__ import annotations

import networkx as nx

from covey.graph.annotations import Priority, read
from covey.graph.control_ops import CONTROL_KEY, describe_guard, guard_of
from covey.graph.ir import Var
from covey.graph.types import type_name

_MERMAID_SHAPES = {
    "llm": ("[", "]"),
    "retrieve": ("[(", ")]"),
    "tool": ("[[", "]]"),
    "function": ("(", ")"),
    "map": ("[/", "/]"),
    "route": ("{", "}"),
    "merge": ("[\\", "/]"),
    "check": ("{{", "}}"),
    "loop": ("[\\", "/]"),
}
_DOT_SHAPES = {"retrieve": "cylinder", "route": "diamond", "check": "hexagon"}


def _label(graph: nx.DiGraph, node: str) -> str:
    """`name: kind`, plus ` p<priority>` once the objective pass has set one."""
    priority = read(graph, node, Priority)
    extra = f" p{priority.value}" if priority is not None else ""
    return f"{node}: {graph.nodes[node]['op'].kind}{extra}"


def _mermaid_id(name: str) -> str:
    return "n_" + "".join(c if c.isalnum() else "_" for c in name)


def _edges(graph: nx.DiGraph) -> list[tuple[str, str, str, bool]]:
    """(source, target, label, is_control) for node edges, then app inputs and outputs. A
    control edge carries its branch key as the label; the flag, not the label text, says it
    is one, since a branch key may be any string."""
    out = []
    for u, v, data in graph.edges(data=True):
        label = ", ".join(var.name for var, _ in data["vars"])
        control = not data["vars"] and CONTROL_KEY in data
        out.append((u, v, str(data[CONTROL_KEY]) if control else label, control))
    for node, data in graph.nodes(data=True):
        for arg in data["args"].values():
            if isinstance(arg, Var) and arg.node is None:
                out.append((f"in:{arg.name}", node, f"{arg.name}: {type_name(arg.type)}", False))
    for name, var in graph.graph["outputs"].items():
        out.append((var.node or f"in:{var.name}", f"out:{name}", name, False))
    return out


def _endpoints(edges: list[tuple[str, str, str, bool]]) -> list[str]:
    """The app's input and output terminals that the edges touch, in a stable order."""
    return sorted({e for u, v, *_ in edges for e in (u, v) if e.startswith(("in:", "out:"))})


def _mermaid_text(text: str) -> str:
    """Text for inside a quoted Mermaid label: a `"` would end the label, so it becomes
    Mermaid's entity code."""
    return text.replace('"', "#quot;")


def _scopes(graph: nx.DiGraph) -> dict[tuple, list[str]]:
    """Guarded nodes grouped by their guard, in graph order."""
    scopes: dict[tuple, list[str]] = {}
    for node in graph:
        guard = guard_of(graph, node)
        if guard:
            scopes.setdefault(guard, []).append(node)
    return scopes


def to_mermaid(graph: nx.DiGraph) -> str:
    lines = ["flowchart TD"]
    for node in graph:
        left, right = _MERMAID_SHAPES[graph.nodes[node]["op"].kind]
        lines.append(f'    {_mermaid_id(node)}{left}"{_label(graph, node)}"{right}')
    for i, (guard, nodes) in enumerate(_scopes(graph).items(), start=1):
        lines.append(f'    subgraph scope{i}["when {describe_guard(guard[-1:])}"]')
        lines += [f"        {_mermaid_id(n)}" for n in nodes]
        lines.append("    end")
    edges = _edges(graph)
    lines += [f'    {_mermaid_id(e)}(("{e}"))' for e in _endpoints(edges)]
    for u, v, label, control in edges:
        arrow = "-.->" if control else "-->"
        lines.append(f'    {_mermaid_id(u)} {arrow}|"{_mermaid_text(label)}"| {_mermaid_id(v)}')
    return "\n".join(lines) + "\n"


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(graph: nx.DiGraph) -> str:
    lines = [f"digraph {_q(graph.graph['app'])} {{", "    rankdir=TB;"]
    for node in graph:
        shape = _DOT_SHAPES.get(graph.nodes[node]["op"].kind, "box")
        lines.append(f"    {_q(node)} [label={_q(_label(graph, node))}, shape={shape}];")
    for i, (guard, nodes) in enumerate(_scopes(graph).items(), start=1):
        lines.append(f"    subgraph cluster_{i} {{")
        lines.append(f"        label={_q('when ' + describe_guard(guard[-1:]))}; style=dashed;")
        lines += [f"        {_q(n)};" for n in nodes]
        lines.append("    }")
    edges = _edges(graph)
    lines += [f"    {_q(e)} [shape=ellipse];" for e in _endpoints(edges)]
    for u, v, label, control in edges:
        style = ", style=dashed" if control else ""
        lines.append(f"    {_q(u)} -> {_q(v)} [label={_q(label)}{style}];")
    return "\n".join(lines) + "\n}\n"
