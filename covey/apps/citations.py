"""Numbered passages in, cited passages out: the contract between a RAG prompt and its answer.

The prompt shows each retrieved result as a `[n] (source)` line followed by the chunk's text;
the model cites `[n]`. Parsing the numbers back maps them to the exact chunks the answer
used, so a caller can show sources without trusting the model to copy ids or file names.

The passages go into the prompt as segments (`passage_segments`): each chunk's text is a
chunk segment in the one canonical form every prompt uses (`chunk_segment`: its text
verbatim), so the engine's chunk KV store reuses its KV wherever it is read again, and the
labels are small static segments around it. The label ends with a newline, and passages are
separated by a blank line, because the engine tokenizes each segment on its own: a cut
after a newline tokenizes exactly as the whole text would, whereas `[1] ` + text would
leave a lone space token before the chunk's first word.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from covey.llm_backend.segments import Segment
from covey.retrieval.documents import SearchResult
from covey.runtime.render import chunk_segment, to_text

SNIPPET_CHARS = 200
# `[2]`, `[1, 3]` and `[1][2]` all cite.
_CITE = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")
# Code is not prose: `[1, 2, 3]` in an example is a list, not three citations. A fence the
# answer never closed (it ran out of tokens) runs to the end.
_CODE = re.compile(r"```.*?(?:```|\Z)|`[^`\n]*`", re.DOTALL)


@dataclass(frozen=True)
class Citation:
    """Passage `number` (from 1, as shown in the prompt) and the chunk it was."""

    number: int
    chunk_id: str
    source: str
    snippet: str


PASSAGE_SEPARATOR = "\n\n"


def label(number: int, result: SearchResult) -> str:
    """The line before passage `number`: `[n] (source)`."""
    return f"[{number}] ({result.chunk.source})\n"


def passage_segments(results: list[SearchResult]) -> list[Segment]:
    """The numbered passages as prompt pieces, numbered from 1 in ranking order: per result
    a static `[n] (source)` label line, then the chunk as a chunk segment; a blank line
    between passages."""
    out: list[Segment] = []
    for i, result in enumerate(results, start=1):
        head = (PASSAGE_SEPARATOR if i > 1 else "") + label(i, result)
        out += [Segment(head, kind="static"), chunk_segment(result)]
    return out


def format_passages(results: list[SearchResult]) -> str:
    """The numbered passages as one text, exactly the text of `passage_segments`."""
    return to_text(passage_segments(results))


def snippet(text: str, limit: int = SNIPPET_CHARS) -> str:
    """The start of `text` on one line, cut at a word boundary with an ellipsis."""
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    cut = flat[:limit].rsplit(" ", 1)[0] or flat[:limit]
    return cut + "..."


def citation(number: int, result: SearchResult) -> Citation:
    chunk = result.chunk
    return Citation(number, chunk.id, chunk.source, snippet(chunk.text))


def cited_numbers(answer: str, count: int) -> list[int]:
    """Passage numbers `answer` cites outside code, first mention first, each once.

    A bracket with any number outside 1..count is not a citation (it is an index or a
    list), so none of its numbers count.
    """
    seen: dict[int, None] = {}
    for match in _CITE.finditer(_CODE.sub(" ", answer)):
        numbers = [int(part) for part in match.group(1).split(",")]
        if all(1 <= n <= count for n in numbers):
            seen.update(dict.fromkeys(numbers))
    return list(seen)


def parse_citations(answer: str, results: list[SearchResult]) -> tuple[Citation, ...]:
    """The passages `answer` cites; empty when it cites none of `results`."""
    return tuple(citation(n, results[n - 1]) for n in cited_numbers(answer, len(results)))


def all_citations(results: list[SearchResult]) -> tuple[Citation, ...]:
    """Every result as a citation: the fallback when an answer cites nothing."""
    return tuple(citation(i, r) for i, r in enumerate(results, start=1))
