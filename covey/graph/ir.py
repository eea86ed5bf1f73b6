"""The IR: a `networkx.DiGraph` whose nodes are operations and whose edges carry variables.

Node attributes: `op` (one of the Op dataclasses below) and `args` (input name -> Var or
Const). Edge attributes: `vars`, the (variable, input name) pairs flowing on that edge; one
edge may carry several variables of the same producer. Graph attributes: `app`, `inputs`
and `outputs` (name -> Var), `passes` (PassRecords appended by the optimizer) and
`awaited` (the outputs a plan is optimized for). Anything else on a node or the graph is
a typed pass annotation (`covey.graph.annotations`); `build_plan` refuses other keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import networkx as nx

from covey.graph.control_ops import ControlOp
from covey.graph.misuse import PLAIN_VALUES, misuse
from covey.graph.template import Template
from covey.graph.tools import ToolBox, ToolSpec

# route, merge, check and loop nodes come from control flow (covey.graph.control_ops)
NodeKind = Literal["llm", "retrieve", "tool", "function", "map", "route", "merge", "check", "loop"]


@dataclass(frozen=True)
class Var:
    """A semantic variable: an app input (`node is None`) or one output of a node."""

    name: str
    type: Any
    node: str | None = None
    output: str | None = None
    app: str = ""

    def __repr__(self) -> str:
        return f"Var({self.name})"

    # A semantic variable has no value while the app is defined: Python operations that
    # need one raise a GraphError naming the construct to use (see covey.graph.misuse).
    def __bool__(self) -> bool:
        raise misuse(self, "bool")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Var):
            return (self.name, self.node, self.output, self.app) == (
                other.name,
                other.node,
                other.output,
                other.app,
            ) and self.type == other.type
        if isinstance(other, PLAIN_VALUES):
            raise misuse(self, "eq")
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    def __hash__(self) -> int:
        return hash((self.name, self.node, self.output, self.app))

    def __lt__(self, other: object) -> bool:
        raise misuse(self, "order")

    __le__ = __gt__ = __ge__ = __lt__

    def __iter__(self) -> Any:
        raise misuse(self, "iter")

    def __len__(self) -> int:
        raise misuse(self, "len")

    def __contains__(self, item: object) -> bool:
        raise misuse(self, "contains")

    def __getitem__(self, key: object) -> Any:
        raise misuse(self, "index")

    def __format__(self, spec: str) -> str:
        raise misuse(self, "format")

    def __add__(self, other: object) -> Any:
        raise misuse(self, "add")

    __radd__ = __add__


@dataclass(frozen=True)
class Const:
    """A literal bound to an input when the app is defined: static text in a prompt."""

    value: Any


Arg = Var | Const


@dataclass(frozen=True)
class LLMCall:
    """One prompt to the engine; `inputs` maps each parameter to its declared type."""

    template: Template
    inputs: dict[str, Any]
    kind: NodeKind = "llm"
    tools: ToolBox | None = None  # tools the template calls or the model may call

    @property
    def outputs(self) -> dict[str, Any]:
        return {g.name: str for g in self.template.gens}


@dataclass(frozen=True)
class Retrieve:
    """A search of the `Searcher` the runtime binds to `index`; `k` and `mode` None keep
    that searcher's own settings, a value overrides them (and `explain()` says so)."""

    index: str
    k: int | None
    mode: str | None
    kind: NodeKind = "retrieve"

    @property
    def inputs(self) -> dict[str, Any]:
        return {"query": str}

    @property
    def outputs(self) -> dict[str, Any]:
        from covey.retrieval.documents import SearchResult

        return {"results": list[SearchResult]}


@dataclass(frozen=True)
class PyCall:
    """A Python callable: a `tool` (may be slow, may have side effects) or a `function`."""

    fn: Callable[..., Any]
    inputs: dict[str, Any]
    returns: Any
    kind: NodeKind = "function"
    spec: ToolSpec | None = None  # a tool's timeout, executor and validators

    @property
    def outputs(self) -> dict[str, Any]:
        return {"result": self.returns}


@dataclass(frozen=True)
class MapOp:
    """Fan-out: `inner` runs once per element of the list bound to input `item`."""

    inner: LLMCall | PyCall
    item: str
    kind: NodeKind = "map"

    @property
    def inputs(self) -> dict[str, Any]:
        return {**self.inner.inputs, self.item: list[self.inner.inputs[self.item]]}

    @property
    def outputs(self) -> dict[str, Any]:
        return {name: list[t] for name, t in self.inner.outputs.items()}


Op = LLMCall | Retrieve | PyCall | MapOp | ControlOp


def llm_template(op: Op) -> Template | None:
    """The template an LLM node (or a fan-out of one) sends to the engine."""
    if isinstance(op, LLMCall):
        return op.template
    if isinstance(op, MapOp) and isinstance(op.inner, LLMCall):
        return op.inner.template
    return None


def new_graph(app: str) -> nx.DiGraph:
    return nx.DiGraph(app=app, inputs={}, outputs={}, passes=())


def add_node(graph: nx.DiGraph, node: str, op: Op, args: dict[str, Arg]) -> None:
    """Add `node` and one edge per producer it reads from; mutates `graph`."""
    graph.add_node(node, op=op, args=dict(args))
    for port, arg in args.items():
        if isinstance(arg, Var) and arg.node is not None:
            if graph.has_edge(arg.node, node):
                graph.edges[arg.node, node]["vars"] += ((arg, port),)
            else:
                graph.add_edge(arg.node, node, vars=((arg, port),))


def output_var(graph: nx.DiGraph, node: str, output: str) -> Var:
    op = graph.nodes[node]["op"]
    return Var(f"{node}.{output}", op.outputs[output], node, output, graph.graph["app"])
