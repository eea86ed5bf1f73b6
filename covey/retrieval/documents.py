"""The records that flow through retrieval: documents in, chunks stored, results out."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


def content_hash(text: str) -> str:
    """sha256 of the text alone, so equal text gets one id whatever its source.

    The chunk KV store keys on this id: identical chunk text means identical KV.
    """
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Document:
    """A whole text to ingest; `source` names where it came from (a path, a URL, a label)."""

    text: str
    source: str


@dataclass(frozen=True)
class Chunk:
    """A piece of a document, the unit that is embedded, indexed and returned.

    `start`/`end` are character offsets into the document text, so `text ==
    document.text[start:end]`; `num_tokens` counts tokens of the chunking tokenizer.
    """

    id: str
    text: str
    source: str
    start: int
    end: int
    num_tokens: int


@dataclass(frozen=True)
class SearchResult:
    """One ranked hit: higher `score` is better; its scale depends on the search mode."""

    chunk: Chunk
    score: float
