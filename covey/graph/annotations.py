"""Typed annotations: what the optimizer passes decide, as `build_plan` reads it.

A pass writes each decision about a node as one frozen dataclass with
`annotate(g, node, ann)`, stored under the class name; `build_plan` reads it back with
`read(g, node, cls)`. Every annotation is one the runtime acts on, so there are none on the
graph as a whole. Before reading, `check(g)` makes a slip fail loudly instead of silently
meaning "not optimized": a node or graph key that is neither the IR's own nor a known
annotation (a misspelt key), a value of the wrong type, or a pass that ran but left a node
without the annotation it writes all raise `PlanError`. A pass that did
not run leaves no annotation, and `build_plan` keeps the naive choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, TypeVar

import networkx as nx

from covey.errors import PlanError
from covey.graph.lowering import Primitive
from covey.graph.template import suggest

# The IR's own attributes (see covey.graph.ir); every other key must be an annotation.
IR_NODE_KEYS = ("op", "args", "guard")
IR_GRAPH_KEYS = ("app", "inputs", "defaults", "outputs", "passes", "awaited")


def _check_items(ann: object, name: str, cls: type) -> None:
    items = getattr(ann, name)
    if not isinstance(items, tuple) or not all(isinstance(i, cls) for i in items):
        raise PlanError(
            f"{type(ann).__name__}.{name} must be a tuple of {cls.__name__}, got {items!r}"
        )


@dataclass(frozen=True)
class Annotation:
    """Base of every annotation; `written_by` names the one pass that writes it."""

    written_by: ClassVar[str]


@dataclass(frozen=True)
class Priority(Annotation):
    """The engine priority of every request this node sends (lower = scheduled sooner);
    the executor passes it to `generate` and prefill-ahead to `prefill`."""

    written_by: ClassVar[str] = "objective_deduction"
    value: int

    def __post_init__(self) -> None:
        if isinstance(self.value, bool) or not isinstance(self.value, int):
            raise PlanError(f"Priority.value must be an int, got {self.value!r}")


@dataclass(frozen=True)
class Lowered(Annotation):
    """The node's prompt as prefill/decode primitives, with `pin` set on its leading static
    segments (prefill-ahead pins those once per app); empty for nodes that are no LLM call."""

    written_by: ClassVar[str] = "prefill_decomposition"
    primitives: tuple[Primitive, ...]

    def __post_init__(self) -> None:
        _check_items(self, "primitives", Primitive)


NODE_ANNOTATIONS: tuple[type[Annotation], ...] = (Priority, Lowered)

A = TypeVar("A", bound=Annotation)


def annotate(g: nx.DiGraph, node: str, ann: object) -> None:
    """Record `ann` on `node` of `g` (a copy the pass owns); replaces one of the same type."""
    if type(ann) not in NODE_ANNOTATIONS:
        names = ", ".join(c.__name__ for c in NODE_ANNOTATIONS)
        raise PlanError(
            f"app {g.graph['app']!r}, node {node!r}: {type(ann).__name__} is not an "
            f"annotation here ({names})"
        )
    g.nodes[node][type(ann).__name__] = ann


def _get(source: dict, cls: type[A], where: str) -> A | None:
    value = source.get(cls.__name__)
    if value is not None and type(value) is not cls:
        raise PlanError(
            f"{where}: annotation {cls.__name__} holds {value!r} "
            f"({type(value).__name__}); write it with annotate(), not by hand"
        )
    return value


def read(g: nx.DiGraph, node: str, cls: type[A]) -> A | None:
    """The `cls` annotation of `node`, or None when the pass that writes it did not run."""
    return _get(g.nodes[node], cls, f"app {g.graph['app']!r}, node {node!r}")


def _check(
    source: dict,
    known: tuple[str, ...],
    classes: tuple[type[Annotation], ...],
    ran: set[str],
    where: str,
) -> None:
    names = known + tuple(c.__name__ for c in classes)
    for key in source:
        if key not in names:
            raise PlanError(
                f"{where}: unknown annotation {key!r}{suggest(str(key), names)} "
                f"(known: {', '.join(names)}); passes write typed annotations with annotate()"
            )
    for cls in classes:
        if _get(source, cls, where) is None and cls.written_by in ran:
            raise PlanError(f"{where}: pass {cls.written_by!r} ran but left no {cls.__name__}")


def check(g: nx.DiGraph) -> None:
    """Raise PlanError on a key nobody reads, a value of the wrong type, or a node that a
    pass which ran left without its annotation; mutates nothing."""
    app = f"app {g.graph['app']!r}"
    ran = {record.name for record in g.graph["passes"]}
    for node, data in g.nodes(data=True):
        _check(data, IR_NODE_KEYS, NODE_ANNOTATIONS, ran, f"{app}, node {node!r}")
    _check(g.graph, IR_GRAPH_KEYS, (), ran, app)
