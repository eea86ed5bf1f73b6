"""Split a chat-template rendering into segments, so retrieved chunks inside chat messages
reach the engine as chunk segments.

A chat template only renders whole conversations to one string, and it may add text
around, between or inside the messages. To find where each chunk landed, the conversation
is rendered twice: once as is, once with invisible markers (private-use characters) around
every chunk and dynamic piece. Removing the markers must give back exactly the plain
rendering; then the marker positions are the pieces' positions in it. A template that
changes its contents (strips, escapes, reorders so the chunks no longer match in order)
fails that check, and the prompt stays one plain string: correct, only without chunk reuse.

Only chunks are cut out: the engine tokenizes each segment on its own, and every extra cut
may change the tokens at it, so the rest stays whole (tagged dynamic where a variable's or
a gen's text lies in it, static otherwise) and the token sequence is the plain text's
wherever a chunk's edges fall between pre-tokens (for example after a newline).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from covey.llm_backend.segments import Segment

CHUNK_OPEN, CHUNK_CLOSE, DYN_OPEN, DYN_CLOSE = "\ue000", "\ue001", "\ue002", "\ue003"
_PAIRS = {CHUNK_OPEN: CHUNK_CLOSE, DYN_OPEN: DYN_CLOSE}
_CLOSERS = set(_PAIRS.values())

Render = Callable[[list[str], str], str]  # (closed messages' contents, open tail) -> text


def _marked(piece: Segment) -> str:
    text = piece.text or ""
    if piece.kind == "chunk":
        return CHUNK_OPEN + text + CHUNK_CLOSE
    if piece.kind == "dynamic":
        return DYN_OPEN + text + DYN_CLOSE
    return text


def _spans(marked: str) -> tuple[str, list[tuple[int, int, str]]] | None:
    """The text without markers and each marked span (start, end, opener); None if the
    markers do not pair up."""
    out: list[str] = []
    spans: list[tuple[int, int, str]] = []
    pos, opened, start = 0, "", 0
    for ch in marked:
        if ch in _PAIRS:
            if opened:
                return None
            opened, start = ch, pos
        elif ch in _CLOSERS:
            if not opened or _PAIRS[opened] != ch:
                return None
            spans.append((start, pos, opened))
            opened = ""
        else:
            out.append(ch)
            pos += 1
    return ("".join(out), spans) if not opened else None


def split_chat(
    render: Render,
    closed: Sequence[Sequence[Segment]],
    open_pieces: Sequence[Segment],
    cut: str | None = None,
) -> tuple[str, list[Segment] | None]:
    """The rendering of `closed` messages (as pieces) plus the open assistant text, and the
    same text as segments (None when it holds no chunk or cannot be split safely).

    With `cut`, both end where `cut` (text added last) first appears; ("", None) when it
    does not appear after some text.
    """

    def joined(pieces: Sequence[Segment], mark: bool) -> str:
        return "".join(_marked(p) if mark else p.text or "" for p in pieces)

    text = render([joined(m, False) for m in closed], joined(open_pieces, False))
    end = len(text)
    if cut is not None:
        end = text.find(cut)
        if end <= 0:
            return "", None
    chunks = [p for m in (*closed, open_pieces) for p in m if p.kind == "chunk"]
    if not chunks:
        return text[:end], None
    parsed = _spans(render([joined(m, True) for m in closed], joined(open_pieces, True)))
    if parsed is None or parsed[0] != text:
        return text[:end], None
    found = [(s, e) for s, e, kind in parsed[1] if kind == CHUNK_OPEN]
    if len(found) != len(chunks) or any(
        text[s:e] != (c.text or "") for (s, e), c in zip(found, chunks, strict=True)
    ):
        return text[:end], None
    dynamic = [(s, e) for s, e, kind in parsed[1] if kind == DYN_OPEN]
    return text[:end], _segments(text, end, zip(found, chunks, strict=True), dynamic)


def _segments(text, end, chunks, dynamic: list[tuple[int, int]]) -> list[Segment]:
    out: list[Segment] = []

    def gap(start: int, stop: int) -> None:
        stop = min(stop, end)
        if start >= stop:
            return
        live = any(s < stop and e > start for s, e in dynamic)
        out.append(Segment(text[start:stop], kind="dynamic" if live else "static"))

    pos = 0
    for (s, e), chunk in chunks:
        if e > end:  # a chunk the cut runs through is not that chunk: plain text
            break
        gap(pos, s)
        if e > s:
            out.append(Segment(text[s:e], kind="chunk", chunk_id=chunk.chunk_id))
        pos = e
    gap(pos, end)
    return out
