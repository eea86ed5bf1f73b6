"""Lower an LLM node's template to prefill and decode primitives over tagged segments.

Shared by the prefix-sharing and prefill-decomposition passes, so both see the same
segments. A segment is `static` (text known at definition: template text, literals),
`chunk` (retrieved results) or `dynamic` (a request input or an upstream output).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import networkx as nx

from covey.graph.ir import Const, MapOp, llm_template
from covey.graph.template import Gen, Ref, Role, Text
from covey.graph.types import is_chunk_type
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.segments import SegmentKind


@dataclass(frozen=True)
class Primitive:
    """`prefill` one segment or `decode` one output.

    For a prefill, `text` is the static text or `var` the variable whose value fills it;
    `source` is the node producing that variable (None for request inputs and literals).
    A chunk prefill over a list of results becomes one engine `Segment` per result, with
    its chunk id, so the chunk KV store can serve each. `per_item`: the element of a map.
    `early`: can be prefilled as soon as the request arrives; `pin`: identical for every
    request, so prefilled once per app and kept in the prefix cache.
    """

    op: Literal["prefill", "decode"]
    role: Role | None
    kind: SegmentKind | None = None
    text: str | None = None
    var: str | None = None
    source: str | None = None
    per_item: bool = False
    params: SamplingParams | None = None
    choices: tuple[str, ...] | None = None
    early: bool = False
    pin: bool = False

    def key(self, node: str) -> tuple:
        """What must be equal for two calls to share this segment's KV."""
        if self.per_item:
            return ("item", node, self.var)
        return (self.op, self.role, self.kind, self.text, self.var)

    def describe(self) -> str:
        if self.op == "decode":
            extra = f" choices={'|'.join(self.choices)}" if self.choices else ""
            tokens = self.params.max_tokens if self.params else "?"
            return f"decode({self.var}, max_tokens={tokens}{extra})"
        flags = "".join(f",{f}" for f, on in (("early", self.early), ("pin", self.pin)) if on)
        what = _preview(self.text) if self.text is not None else self.var
        return f"prefill[{self.kind}{flags}]({what})"


def _preview(text: str, width: int = 24) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= width else flat[: width - 3] + "...")


def _ref(graph: nx.DiGraph, node: str, ref: Ref) -> Primitive:
    op, arg = graph.nodes[node]["op"], graph.nodes[node]["args"][ref.name]
    if isinstance(arg, Const):
        return Primitive("prefill", ref.role, "static", text=str(arg.value))
    item = isinstance(op, MapOp) and ref.name == op.item
    kind: SegmentKind = "chunk" if is_chunk_type(op.inputs[ref.name]) else "dynamic"
    name = f"{arg.name}[i]" if item else arg.name
    return Primitive("prefill", ref.role, kind, var=name, source=arg.node, per_item=item)


def lower(graph: nx.DiGraph, node: str) -> tuple[Primitive, ...]:
    """The node's template as primitives in prompt order; adjacent static text merges."""
    template = llm_template(graph.nodes[node]["op"])
    if template is None:
        return ()
    out: list[Primitive] = []
    for part in template.parts:
        if isinstance(part, Gen):
            var = f"{node}.{part.name}"
            out.append(Primitive("decode", part.role, var=var, params=part.params))
            out[-1] = replace(out[-1], choices=part.choices)
            continue
        prim = (
            Primitive("prefill", part.role, "static", text=part.text)
            if isinstance(part, Text)
            else _ref(graph, node, part)
        )
        prev = out[-1] if out else None
        if prev and prev.kind == prim.kind == "static" and prev.role == prim.role:
            out[-1] = replace(prev, text=(prev.text or "") + (prim.text or ""))
        else:
            out.append(prim)
    return tuple(out)


def leading_prefill(prims: tuple[Primitive, ...]) -> tuple[Primitive, ...]:
    """The prefills before the first decode: the part of the prompt known before generating."""
    out = []
    for p in prims:
        if p.op == "decode":
            break
        out.append(p)
    return tuple(out)
