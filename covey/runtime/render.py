"""Render an LLM node's primitives, with its variables' values, into engine prompts.

A template with roles goes through the model's own chat template, so the model sees the
format it was trained on. A plain template becomes a list of `Segment`s tagged static,
chunk (one per retrieved result, with its chunk id) or dynamic, so the engine knows where
each piece lies. A chat prompt that carries retrieved chunks is split the same way after the
chat template has rendered it (see `ChatSplit`): its text is exactly the plain rendering,
cut so that each chunk is its own segment. Several gens share one growing context: each
gen's prompt is everything rendered and generated before it.
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
from covey.runtime.chat_split import split_chat

CHUNK_SEPARATOR = "\n\n"


def chunk_segment(item: SearchResult | Chunk) -> Segment:
    """How a retrieved chunk enters every prompt: its own text, verbatim, tagged with its id.

    One canonical form for all templates and apps, so the chunk KV store sees the same tokens
    wherever a chunk is read, and the runtime can warm a retrieval's chunks before the
    prompt that reads them is rendered (`Runtime`, retrieval-prefill pipelining).
    """
    chunk = item.chunk if isinstance(item, SearchResult) else item
    return Segment(chunk.text, kind="chunk", chunk_id=chunk.id)


def is_segment_list(value: Any) -> bool:
    """A value that is already prompt pieces (e.g. passages with their citation labels)."""
    return isinstance(value, list | tuple) and bool(value) and all(
        isinstance(v, Segment) for v in value
    )


def to_text(value: Any) -> str:
    """How a variable's value reads inside a prompt: results by their text, lists by line,
    prompt pieces by their concatenated text."""
    if isinstance(value, SearchResult):
        return value.chunk.text
    if isinstance(value, Chunk):
        return value.text
    if isinstance(value, Segment):
        return value.text if value.text is not None else ""
    if is_segment_list(value):
        return "".join(to_text(v) for v in value)
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
        if isinstance(item, SearchResult | Chunk):
            out.append(chunk_segment(item))
        else:
            out.append(Segment(to_text(item), kind="chunk"))
    return out


def value_segments(kind: SegmentKind, value: Any) -> list[Segment]:
    """A variable's value as prompt pieces: chunks one per result, ready pieces as they are,
    anything else one piece of text of the primitive's kind."""
    if kind == "chunk":
        return chunk_segments(value)
    if is_segment_list(value):
        return list(value)
    return [Segment(to_text(value), kind=kind)]


@dataclass
class Turn:
    """One chat message as pieces, so a chunk inside it stays addressable."""

    role: str
    pieces: list[Segment] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(p.text or "" for p in self.pieces)


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
    turns: list[Turn] = field(default_factory=list)

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": t.role, "content": t.text} for t in self.turns]

    def add_prefill(self, prim: Primitive, value: Any) -> None:
        """Append one prefill primitive; `value` is the variable's value (None for text)."""
        kind: SegmentKind = prim.kind or "static"
        pieces = (
            [Segment(prim.text, kind="static")]
            if prim.text is not None
            else value_segments(kind, value)
        )
        for piece in pieces:
            if self.uses_roles:
                self.add_piece(prim.role or "user", piece)
            else:
                self._add_segment(piece)

    def add_generated(self, role: str | None, text: str, token_ids: list[int]) -> None:
        """Append a gen's output; plain prompts keep its exact token ids (no re-tokenizing).
        Without ids (a token-healed gen: its first token includes text of the prompt's
        end), the text joins the text before it, so the two tokenize as one piece."""
        if self.uses_roles:
            self.add_text(role or "assistant", text, kind="dynamic")
        elif self.as_text:
            self._add_segment(Segment(text, kind="dynamic"))
        elif token_ids:
            self.segments.append(Segment(token_ids=tuple(token_ids), kind="dynamic"))
        else:
            last = self.segments[-1] if self.segments else None
            if last is not None and last.text is not None and last.kind != "chunk":
                self.segments[-1] = Segment(last.text + text, kind=last.kind)
            else:
                self._add_segment(Segment(text, kind="dynamic"))

    def prompt(self) -> str | list[Segment]:
        """Everything so far, as the engine prompt for the next gen: a chat prompt with
        chunks in it is a Segment list whose text is the chat rendering; without chunks (or
        for an engine without segments) it is that text."""
        if not self.uses_roles:
            if self.as_text:
                return "".join(seg.text or "" for seg in self.segments)
            return list(self.segments)
        text, segments = self.chat_rendering()
        if self.as_text or segments is None:
            return text
        return segments

    def chat_rendering(self, cut: str | None = None) -> tuple[str, list[Segment] | None]:
        """The chat template's text of everything so far, and the same text as segments
        (None when no chunk is in it, or the template's output cannot be split safely).
        With `cut`, both end where that text (a marker added last) begins, or are empty."""
        if self.tokenizer is None:
            raise ConfigError(
                "this template uses chat roles, but the engine's model has no tokenizer (and "
                "so no chat template); serve it with a model that has one"
            )
        closed, open_pieces = self.turns, []
        if closed and closed[-1].role == "assistant":
            closed, open_pieces = closed[:-1], closed[-1].pieces
        tokenizer = self.tokenizer

        def render(contents: list[str], tail: str) -> str:
            messages = [
                {"role": t.role, "content": c} for t, c in zip(closed, contents, strict=True)
            ]
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True) + tail

        return split_chat(render, [t.pieces for t in closed], open_pieces, cut)

    def _add_segment(self, seg: Segment) -> None:
        if seg.text != "":
            self.segments.append(seg)

    def add_dynamic(self, role: str | None, text: str) -> None:
        """Append text known only at run time (a tool's result) where the context stands:
        in `role`'s voice (default: the assistant's, whose turn it interrupts) for a chat
        prompt, as a dynamic segment for a plain one."""
        if self.uses_roles:
            self.add_text(role or "assistant", text, kind="dynamic")
        else:
            self._add_segment(Segment(text, kind="dynamic"))

    def add_text(self, role: str, text: str, kind: SegmentKind = "static") -> None:
        """Append text in `role`'s voice: to its open message, or as a new message."""
        self.add_piece(role, Segment(text, kind=kind))

    def add_piece(self, role: str, piece: Segment) -> None:
        """Append a piece in `role`'s voice; adjacent non-chunk text of one kind merges."""
        if not self.turns or self.turns[-1].role != role:
            self.turns.append(Turn(role))
        pieces = self.turns[-1].pieces
        if piece.token_ids is not None:
            raise ConfigError("a chat template renders text; a token-id piece cannot go in it")
        if piece.text == "":
            return
        last = pieces[-1] if pieces else None
        if last is not None and piece.kind != "chunk" and last.kind == piece.kind:
            pieces[-1] = Segment((last.text or "") + (piece.text or ""), kind=piece.kind)
        else:
            pieces.append(piece)


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
    """The prompt of the first `count` primitives (all prefills), exactly as it begins the
    full prompt (as text, or as segments where chunks lie in it); None when there is nothing
    to prefill ahead.

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

    def before(marker: str) -> tuple[str, list[Segment] | None]:
        ctx = Context(tokenizer, uses_roles)
        for prim in prims[:count]:
            ctx.add_prefill(prim, None if prim.text is not None else resolve(prim))
        ctx.add_text(role, marker)
        return ctx.chat_rendering(cut=marker)

    text, segments = before(CUT)
    if not text or text != before(CUT[::-1] + "~")[0]:
        return None
    return text if as_text or segments is None else segments
