"""Token-budgeted, sentence-aware chunking with overlap.

Chunks are measured in the serving model's tokens (the budget they spend in a prompt) and
end on sentence or paragraph boundaries when they can, falling back to lines, words and
finally characters for text with no boundaries. Offsets point into the original text.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from covey.errors import ConfigError
from covey.retrieval.documents import Chunk, Document, content_hash
from covey.retrieval.tokenizers import TokenizerLike

# A sentence ends at . ! or ? (with closing quotes/brackets) then whitespace; a blank line
# ends a paragraph. Single newlines do not split: prose is often hard-wrapped.
_SENTENCE = re.compile(r"[.!?][\"')\]]*\s+|\n[ \t]*\n\s*")
# Finer split points, tried in order, for a sentence that alone exceeds the budget.
_FINER = (re.compile(r"\n"), re.compile(r"\s+"))


@dataclass(frozen=True)
class ChunkerConfig:
    """`chunk_tokens` is the most tokens a chunk holds; `overlap_tokens` how many (in whole
    sentences) the next chunk repeats from the end of the previous one, for context."""

    chunk_tokens: int = 200
    overlap_tokens: int = 32

    def __post_init__(self) -> None:
        if self.chunk_tokens <= 0:
            raise ConfigError(f"chunk_tokens must be > 0, got {self.chunk_tokens}")
        if not 0 <= self.overlap_tokens < self.chunk_tokens:
            raise ConfigError(
                f"overlap_tokens must be in [0, chunk_tokens={self.chunk_tokens}), "
                f"got {self.overlap_tokens}"
            )


@dataclass(frozen=True)
class _Unit:
    start: int
    end: int
    tokens: int


def _spans(text: str, start: int, end: int, pattern: re.Pattern[str]) -> list[tuple[int, int]]:
    """Cut text[start:end] after each match of `pattern`; the pieces cover it exactly."""
    cuts = [m.end() for m in pattern.finditer(text, start, end) if start < m.end() < end]
    bounds = [start, *cuts, end]
    return [(a, b) for a, b in itertools.pairwise(bounds) if a < b]


def _fit(
    text: str, start: int, end: int, tokenizer: TokenizerLike, budget: int, level: int
) -> list[_Unit]:
    """Split text[start:end] into units of at most `budget` tokens, coarsest cuts first."""
    n = len(tokenizer.encode(text[start:end]))
    if n <= budget or end - start <= 1:
        return [_Unit(start, end, n)]
    if level < len(_FINER):
        pieces = _spans(text, start, end, _FINER[level])
        if len(pieces) == 1:
            return _fit(text, start, end, tokenizer, budget, level + 1)
        return [u for s, e in pieces for u in _fit(text, s, e, tokenizer, budget, level + 1)]
    # No boundary left (one huge "word"): cut by characters, sized from the token density.
    step = max(1, (end - start) * budget // (n + 1))
    return [
        u
        for s in range(start, end, step)
        for u in _fit(text, s, min(end, s + step), tokenizer, budget, level)
    ]


def _units(text: str, tokenizer: TokenizerLike, budget: int) -> list[_Unit]:
    units: list[_Unit] = []
    for s, e in _spans(text, 0, len(text), _SENTENCE):
        units.extend(_fit(text, s, e, tokenizer, budget, 0))
    return units


def _make_chunk(doc: Document, start: int, end: int, tokenizer: TokenizerLike) -> Chunk | None:
    """A chunk over doc.text[start:end] minus surrounding whitespace; None if nothing is left."""
    raw = doc.text[start:end]
    stripped = raw.strip()
    if not stripped:
        return None
    start += len(raw) - len(raw.lstrip())
    end = start + len(stripped)
    return Chunk(
        id=content_hash(stripped),
        text=stripped,
        source=doc.source,
        start=start,
        end=end,
        num_tokens=len(tokenizer.encode(stripped)),
    )


def chunk_document(doc: Document, tokenizer: TokenizerLike, config: ChunkerConfig) -> list[Chunk]:
    """Greedily pack sentence units into chunks of at most `config.chunk_tokens` tokens.

    Token counts of units are summed as an estimate and every chunk is re-encoded whole, so
    `num_tokens` is exact and within budget whenever the chunk has more than one unit.
    """
    budget = config.chunk_tokens
    units = _units(doc.text, tokenizer, budget)
    chunks: list[Chunk] = []
    i = 0
    while i < len(units):
        j, total = i, 0
        while j < len(units) and (j == i or total + units[j].tokens <= budget):
            total += units[j].tokens
            j += 1
        chunk = _make_chunk(doc, units[i].start, units[j - 1].end, tokenizer)
        while chunk is not None and chunk.num_tokens > budget and j - i > 1:
            j -= 1
            chunk = _make_chunk(doc, units[i].start, units[j - 1].end, tokenizer)
        if chunk is not None:
            chunks.append(chunk)
        if j >= len(units):
            break
        i = _overlap_start(units, i, j, config.overlap_tokens)
    return chunks


def _overlap_start(units: list[_Unit], i: int, j: int, overlap: int) -> int:
    """First unit of the next chunk: whole trailing sentences of this chunk that fit in
    `overlap` tokens, never reaching back to `i` so every step makes progress."""
    k, used = j, 0
    while k - 1 > i and used + units[k - 1].tokens <= overlap:
        k -= 1
        used += units[k].tokens
    return k
