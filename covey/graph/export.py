"""Mermaid and DOT text of an app graph, for docs, notebooks and `dot -Tsvg`."""

from __future__ import annotations

import networkx as nx

from covey.graph.annotations import Priority, read
from covey.graph.ir import Var
from covey.graph.types import type_name

_MERMAID_SHAPES = {
    "llm": ("[", "]"),
    "retrieve": ("[(", ")]"),
    "tool": ("[[", "]]"),
    "function": ("(", ")"),
    "map": ("[/", "/]"),
}


def _label(graph: nx.DiGraph, node: str) -> str:
    """`name: kind`, plus ` p<priority>` once the objective pass has set one."""
    priority = read(graph, node, Priority)
    extra = f" p{priority.value}" if priority is not None else ""
    return f"{node}: {graph.nodes[node]['op'].kind}{extra}"


def _mermaid_id(name: str) -> str:
    return "n_" + "".join(c if c.isalnum() else "_" for c in name)


def _edges(graph: nx.DiGraph) -> list[tuple[str, str, str]]:
    """(source, target, label) for node edges, then app inputs and outputs."""
    out = []
    for u, v, data in graph.edges(data=True):
        out.append((u, v, ", ".join(var.name for var, _ in data["vars"])))
    for node, data in graph.nodes(data=True):
        for arg in data["args"].values():
            if isinstance(arg, Var) and arg.node is None:
                out.append((f"in:{arg.name}", node, f"{arg.name}: {type_name(arg.type)}"))
    for name, var in graph.graph["outputs"].items():
        out.append((var.node or f"in:{var.name}", f"out:{name}", name))
    return out


def _endpoints(edges: list[tuple[str, str, str]]) -> list[str]:
    """The app's input and output terminals that the edges touch, in a stable order."""
    return sorted({e for u, v, _ in edges for e in (u, v) if e.startswith(("in:", "out:"))})


def to_mermaid(graph: nx.DiGraph) -> str:
    lines = ["flowchart TD"]
    for node in graph:
        left, right = _MERMAID_SHAPES[graph.nodes[node]["op"].kind]
        lines.append(f'    {_mermaid_id(node)}{left}"{_label(graph, node)}"{right}')
    edges = _edges(graph)
    lines += [f'    {_mermaid_id(e)}(("{e}"))' for e in _endpoints(edges)]
    for u, v, label in edges:
        lines.append(f'    {_mermaid_id(u)} -->|"{label}"| {_mermaid_id(v)}')
    return "\n".join(lines) + "\n"


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(graph: nx.DiGraph) -> str:
    lines = [f"digraph {_q(graph.graph['app'])} {{", "    rankdir=TB;"]
    for node in graph:
        shape = "box" if graph.nodes[node]["op"].kind != "retrieve" else "cylinder"
        lines.append(f"    {_q(node)} [label={_q(_label(graph, node))}, shape={shape}];")
    edges = _edges(graph)
    lines += [f"    {_q(e)} [shape=ellipse];" for e in _endpoints(edges)]
    for u, v, label in edges:
        lines.append(f"    {_q(u)} -> {_q(v)} [label={_q(label)}];")
    return "\n".join(lines) + "\n}\n"
