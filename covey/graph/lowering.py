"""Lower an LLM node's template to prefill and decode primitives over tagged segments.

The plan's primitives come from here (through the prefill-decomposition pass, or
`build_plan` when it did not run), so the runtime, `explain()` and the shared-prefix
analysis see the same segments; `Primitive.known` is the one rule for which leading
segments can be prefilled ahead, used by the runtime's prefill-ahead and by `explain()`.
A segment is `static` (text known at definition: template text, literals), `chunk`
(retrieved results) or `dynamic` (a request input or an upstream output).
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass, replace
from typing import Literal

import networkx as nx

from covey.graph.ir import Const, MapOp, llm_template
from covey.graph.template import Call, Gen, Ref, Role, Text
from covey.graph.tool_use import bind_call
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
    `pin`: a leading static segment, identical for every request, so prefill-ahead
    prefills it once per app and pins it in the engine's prefix cache.
    """

    op: Literal["prefill", "decode", "call"]
    role: Role | None
    kind: SegmentKind | None = None
    text: str | None = None
    var: str | None = None
    source: str | None = None
    per_item: bool = False
    params: SamplingParams | None = None
    choices: tuple[str, ...] | None = None
    pin: bool = False
    tool: str | None = None  # a call: the tool, and each parameter's input or output name
    args: tuple[tuple[str, str], ...] = ()

    def key(self, node: str) -> tuple:
        """What must be equal for two calls to share this segment's KV."""
        if self.per_item:
            return ("item", node, self.var)
        return (self.op, self.role, self.kind, self.text, self.var)

    def known(self, values: Container[str]) -> bool:
        """Whether this prefill's text is known once the variables named in `values` have
        values: static text always, a variable once it has a value, a fan-out element only
        inside its own call. Prefill-ahead prefills a call's leading known segments."""
        if self.op != "prefill":
            return False
        return self.text is not None or (not self.per_item and str(self.var) in values)

    def describe(self) -> str:
        if self.op == "call":
            return f"call({self.tool}: {', '.join(f'{p}={r}' for p, r in self.args)})"
        if self.op == "decode":
            extra = f" choices={'|'.join(self.choices)}" if self.choices else ""
            tokens = self.params.max_tokens if self.params else "?"
            return f"decode({self.var}, max_tokens={tokens}{extra})"
        flags = ",pin" if self.pin else ""
        what = _preview(self.text) if self.text is not None else self.var
        return f"prefill[{self.kind}{flags}]({what})"


def _preview(text: str, width: int = 32) -> str:
    """The segment's text as Python writes it, whitespace and all (a trailing space before a
    gen changes what the model generates); a long one shows its exact start and end."""
    if len(text) <= width:
        return repr(text)
    half = width // 2
    return f"{text[:half]!r}...{text[-half:]!r}"


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
    op = graph.nodes[node]["op"]
    box = getattr(op.inner if isinstance(op, MapOp) else op, "tools", None)
    for part in template.parts:
        if isinstance(part, Call) and box is not None:
            args = tuple(bind_call(part, box.called[part.tool], node).items())
            out.append(Primitive("call", part.role, tool=part.tool, args=args))
            continue
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


def known_prefix(prims: tuple[Primitive, ...], values: Container[str]) -> int:
    """How many leading primitives are prefills known given `values` (see Primitive.known):
    only a prefix can be prefilled ahead, since a token's KV depends on every token before."""
    count = 0
    while count < len(prims) and prims[count].known(values):
        count += 1
    return count


def leading_prefill(prims: tuple[Primitive, ...]) -> tuple[Primitive, ...]:
    """The prefills before the first decode: the part of the prompt known before generating."""
    out = []
    for p in prims:
        if p.op == "decode":
            break
        out.append(p)
    return tuple(out)
