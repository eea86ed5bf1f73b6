"""Render an LLM node's primitives, with its variables' values, into engine prompts.

A template with roles goes through the model's own chat template, so the model sees the
format it was trained on. A plain template becomes a list of `Segment`s tagged static,
chunk (one per retrieved result, with its chunk id) or dynamic, so the engine knows where
each piece lies. Several gens share one growing context: each gen's prompt is everything
rendered and generated before it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from covey.errors import ConfigError
from covey.graph.lowering import Primitive
from covey.llm_backend.engine_client import ChatTokenizer
from covey.llm_backend.segments import Segment, SegmentKind
from covey.retrieval.documents import Chunk, SearchResult

CHUNK_SEPARATOR = "\n\n"


def to_text(value: Any) -> str:
    """How a variable's value reads inside a prompt: results by their text, lists by line."""
    if isinstance(value, SearchResult):
        return value.chunk.text
    if isinstance(value, Chunk):
        return value.text
    if isinstance(value, list | tuple):
        return "\n".join(to_text(v) for v in value)
    return str(value)


def chunk_segments(value: Any) -> list[Segment]:
    """One chunk segment per retrieved result, so the chunk KV store can address each."""
    items = value if isinstance(value, list | tuple) else [value]
    out: list[Segment] = []
    for i, item in enumerate(items):
        if i:
            out.append(Segment(CHUNK_SEPARATOR, kind="static"))
        chunk = item.chunk if isinstance(item, SearchResult) else item
        if isinstance(chunk, Chunk):
            out.append(Segment(chunk.text, kind="chunk", chunk_id=chunk.id))
        else:
            out.append(Segment(to_text(item), kind="chunk"))
    return out


@dataclass
class Context:
    """The growing context of one LLM call; mutated by `add_*` as prefills and gens happen.

    `as_text`: the engine takes no `Segment` prompts (a remote backend without the
    `segments` capability), so a plain template is sent as one string and generated text is
    appended as text; only the chunk-aware KV reuse is lost.
    """

    tokenizer: ChatTokenizer | None
    uses_roles: bool
    as_text: bool = False
    segments: list[Segment] = field(default_factory=list)
    messages: list[dict[str, str]] = field(default_factory=list)

    def add_prefill(self, prim: Primitive, value: Any) -> None:
        """Append one prefill primitive; `value` is the variable's value (None for text)."""
        kind: SegmentKind = prim.kind or "static"
        if self.uses_roles:
            text = prim.text if prim.text is not None else _chat_text(kind, value)
            self.add_text(prim.role or "user", text)
        elif prim.text is not None:
            self._add_segment(Segment(prim.text, kind="static"))
        elif kind == "chunk":
            for seg in chunk_segments(value):
                self._add_segment(seg)
        else:
            self._add_segment(Segment(to_text(value), kind=kind))

    def add_generated(self, role: str | None, text: str, token_ids: list[int]) -> None:
        """Append a gen's output; plain prompts keep its exact token ids (no re-tokenizing)."""
        if self.uses_roles:
            self.add_text(role or "assistant", text)
        elif self.as_text:
            self._add_segment(Segment(text, kind="dynamic"))
        elif token_ids:
            self.segments.append(Segment(token_ids=tuple(token_ids), kind="dynamic"))

    def prompt(self) -> str | list[Segment]:
        """Everything so far, as the engine prompt for the next gen."""
        if not self.uses_roles:
            if self.as_text:
                return "".join(seg.text or "" for seg in self.segments)
            return list(self.segments)
        if self.tokenizer is None:
            raise ConfigError(
                "this template uses chat roles, but the engine's model has no tokenizer (and "
                "so no chat template); serve it with a model that has one"
            )
        closed, open_text = self.messages, ""
        if closed and closed[-1]["role"] == "assistant":
            closed, open_text = closed[:-1], closed[-1]["content"]
        return self.tokenizer.apply_chat_template(closed, add_generation_prompt=True) + open_text

    def _add_segment(self, seg: Segment) -> None:
        if seg.text != "":
            self.segments.append(seg)

    def add_text(self, role: str, text: str) -> None:
        """Append text in `role`'s voice: to its open message, or as a new message."""
        if self.messages and self.messages[-1]["role"] == role:
            self.messages[-1]["content"] += text
        else:
            self.messages.append({"role": role, "content": text})


def _chat_text(kind: SegmentKind, value: Any) -> str:
    if kind == "chunk":
        items = value if isinstance(value, list | tuple) else [value]
        return CHUNK_SEPARATOR.join(to_text(v) for v in items)
    return to_text(value)


def render_prompts(
    prims: tuple[Primitive, ...],
    resolve: Callable[[Primitive], Any],
    tokenizer: ChatTokenizer | None,
    uses_roles: bool,
    generated: dict[str, tuple[str, list[int]]],
    as_text: bool = False,
) -> dict[str, str | list[Segment]]:
    """The prompt of every decode, given what each earlier gen produced (var -> text, ids).

    The executor renders as it goes; this one-shot form lets tests and benchmarks build the
    exact prompts a node sends, to replay them against the engine directly.
    """
    ctx = Context(tokenizer, uses_roles, as_text)
    out: dict[str, str | list[Segment]] = {}
    for prim in prims:
        if prim.op == "prefill":
            ctx.add_prefill(prim, None if prim.text is not None else resolve(prim))
            continue
        var = str(prim.var)
        out[var] = ctx.prompt()
        text, ids = generated.get(var, ("", []))
        ctx.add_generated(prim.role, text, ids)
    return out


CUT = "\x00covey-cut\x00"


def leading_prompt(
    prims: tuple[Primitive, ...],
    count: int,
    resolve: Callable[[Primitive], Any],
    tokenizer: ChatTokenizer | None,
    uses_roles: bool,
    as_text: bool = False,
) -> str | list[Segment] | None:
    """The prompt text of the first `count` primitives (all prefills), exactly as it begins
    the full prompt; None when there is nothing to prefill ahead.

    A chat template only renders whole conversations, so the rest is stood in for by a
    marker and the rendering is cut there. Two different markers must give the same text
    before them: a template whose start depends on what comes later has no safe prefix.
    """
    if count <= 0 or count >= len(prims):
        return None
    if not uses_roles:
        ctx = Context(tokenizer, uses_roles, as_text)
        for prim in prims[:count]:
            ctx.add_prefill(prim, None if prim.text is not None else resolve(prim))
        return ctx.prompt() or None
    nxt = prims[count]
    role = nxt.role or ("assistant" if nxt.op == "decode" else "user")

    def before(marker: str) -> str | None:
        ctx = Context(tokenizer, uses_roles)
        for prim in prims[:count]:
            ctx.add_prefill(prim, None if prim.text is not None else resolve(prim))
        ctx.add_text(role, marker)
        text = ctx.prompt()
        assert isinstance(text, str)
        at = text.find(marker)
        return text[:at] if at > 0 else None

    first = before(CUT)
    return first if first is not None and first == before(CUT[::-1] + "~") else None
