"""Map-reduce summary: split a long document, summarize the pieces in parallel, combine.

A document longer than a small model reads well is split at paragraph, then sentence,
boundaries into pieces of at most `piece_chars` characters (about four per token). The
summarize call fans out over the pieces with its fixed instruction first, so every element
shares that prefix and the pieces decode as one batch; a final call combines the partial
summaries, numbered in document order, into one.
"""

from __future__ import annotations

import re

import covey.graph as cg
from covey.errors import ConfigError, InvalidRequestError
from covey.graph import App
from covey.llm_backend.sampling_params import SamplingParams

PIECE_CHARS = 1200
MAX_PIECES = 32
PIECE_MAX_TOKENS = 48
SUMMARY_MAX_TOKENS = 96
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def summarize_piece(piece: str):
    """{{#system}}
    You summarize documents. Summarize this part of a longer document in one or two
    sentences, keeping names and numbers.
    {{#user}}
    {{piece}}
    {{#assistant}}
    {{gen summary}}"""


def combine_summaries(summaries: str):
    """{{#system}}
    You summarize documents. These are summaries of consecutive parts of one document, in
    order. Combine them into one short summary of the whole document.
    {{#user}}
    {{summaries}}
    {{#assistant}}
    {{gen summary}}"""


def _hard_split(text: str, max_chars: int) -> list[str]:
    """Cut text with no sentence break at the last space before the limit (or at it)."""
    out = []
    while len(text) > max_chars:
        cut = text.rfind(" ", 1, max_chars + 1)
        cut = cut if cut > 0 else max_chars
        out.append(text[:cut].rstrip())
        text = text[cut:].lstrip()
    return [*out, text] if text else out


def _units(text: str, max_chars: int) -> list[tuple[str, str]]:
    """(separator before, text) units no longer than `max_chars`: whole paragraphs, else
    their sentences, else pieces of a sentence."""
    units: list[tuple[str, str]] = []
    for paragraph in _PARAGRAPH_BREAK.split(text.strip()):
        paragraph = paragraph.strip()
        if len(paragraph) <= max_chars:
            units.append(("\n\n", paragraph))
            continue
        sep = "\n\n"
        for sentence in _SENTENCE_END.split(paragraph):
            for part in _hard_split(sentence, max_chars):
                units.append((sep, part))
                sep = " "
    return units


def split_text(text: str, max_chars: int = PIECE_CHARS, max_pieces: int = MAX_PIECES) -> list[str]:
    """Pack paragraphs (or sentences of long ones) in order into pieces of <= `max_chars`.

    Deterministic, and no text is lost except the whitespace at the boundaries.
    """
    if max_chars <= 0:
        raise InvalidRequestError(f"max_chars must be positive, got {max_chars}")
    if not text.strip():
        raise InvalidRequestError("text is empty; there is nothing to summarize")
    pieces: list[str] = []
    for sep, unit in _units(text, max_chars):
        if pieces and len(pieces[-1]) + len(sep) + len(unit) <= max_chars:
            pieces[-1] += sep + unit
        else:
            pieces.append(unit)
    if len(pieces) > max_pieces:
        raise InvalidRequestError(
            f"text splits into {len(pieces)} pieces of up to {max_chars} characters, more than "
            f"max_pieces={max_pieces}; raise piece_chars or max_pieces, or send a shorter text"
        )
    return pieces


def number_summaries(summaries: list[str]) -> str:
    """`1. ...` per partial summary, in document order, one per line."""
    return "\n".join(f"{i}. {' '.join(s.split())}" for i, s in enumerate(summaries, start=1))


def build_summary_app(
    piece_chars: int = PIECE_CHARS,
    piece_max_tokens: int = PIECE_MAX_TOKENS,
    summary_max_tokens: int = SUMMARY_MAX_TOKENS,
    max_pieces: int = MAX_PIECES,
) -> App:
    """The graph: split -> map(summarize_piece) -> number -> combine_summaries.

    Input `text`; outputs `summary`, `pieces` and `partial_summaries` (one per piece, in
    order). Greedy decoding.
    """
    if piece_chars <= 0 or max_pieces <= 0:
        raise ConfigError(
            f"piece_chars and max_pieces must be positive, got {piece_chars} and {max_pieces}"
        )
    summarize = cg.semantic_function(
        summarize_piece, params=SamplingParams(max_tokens=piece_max_tokens, temperature=0.0)
    )
    combine = cg.semantic_function(
        combine_summaries, params=SamplingParams(max_tokens=summary_max_tokens, temperature=0.0)
    )
    split, number = cg.function(split_text), cg.function(number_summaries)

    @cg.app(name="mapreduce_summary")
    def mapreduce_summary(text: str):
        pieces = split(text=text, max_chars=piece_chars, max_pieces=max_pieces)
        partials = cg.map(summarize, over=pieces)
        summary = combine(summaries=number(summaries=partials))
        return {"summary": summary, "pieces": pieces, "partial_summaries": partials}

    return mapreduce_summary


summary_app = build_summary_app()
