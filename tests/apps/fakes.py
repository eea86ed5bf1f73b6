"""Search results without an index, and a retriever that returns canned ones."""

from __future__ import annotations

from dataclasses import dataclass, field

from covey.retrieval.documents import Chunk, SearchResult, content_hash
from covey.retrieval.searcher import DEFAULT_K


def hit(text: str, source: str = "doc", score: float = 1.0) -> SearchResult:
    return SearchResult(Chunk(content_hash(text), text, source, 0, len(text), 8), score)


@dataclass
class FakeRetriever:
    """A `Searcher` whose `search` returns `results` whatever the query (at most k, default
    DEFAULT_K), and records the queries."""

    results: list[SearchResult]
    queries: list[str] = field(default_factory=list)

    def search(self, query, k=None, mode=None, sources=None) -> list[SearchResult]:
        self.queries.append(query)
        return self.results[: k or DEFAULT_K]
