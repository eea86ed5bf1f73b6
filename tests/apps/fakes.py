"""Search results without an index, and a retriever that returns canned ones."""

from __future__ import annotations

from dataclasses import dataclass, field

from covey.retrieval.documents import Chunk, SearchResult, content_hash


def hit(text: str, source: str = "doc", score: float = 1.0) -> SearchResult:
    return SearchResult(Chunk(content_hash(text), text, source, 0, len(text), 8), score)


@dataclass
class FakeRetriever:
    """`search` returns `results` whatever the query, and records the queries."""

    results: list[SearchResult]
    queries: list[str] = field(default_factory=list)

    def search(self, query: str, k: int, mode: str) -> list[SearchResult]:
        self.queries.append(query)
        return self.results[:k]
