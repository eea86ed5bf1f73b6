"""Retriever: a query-in, chunks-out component with fixed search settings, the shape the
graph runtime's retriever nodes call (sync, or async off the event loop)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from covey.retrieval.document_index import DocumentIndex
from covey.retrieval.documents import SearchResult
from covey.retrieval.search import MODES, Reranker


@dataclass(frozen=True)
class RetrieverConfig:
    k: int = 5
    mode: str = "hybrid"
    sources: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.k <= 0:
            raise ValueError(f"k must be > 0, got {self.k}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")


class Retriever:
    """Binds a DocumentIndex to one RetrieverConfig (and optional reranker)."""

    def __init__(
        self,
        index: DocumentIndex,
        config: RetrieverConfig | None = None,
        reranker: Reranker | None = None,
    ) -> None:
        self.index = index
        self.config = config or RetrieverConfig()
        self.reranker = reranker

    def retrieve(self, query: str) -> list[SearchResult]:
        c = self.config
        sources: Sequence[str] | None = list(c.sources) if c.sources is not None else None
        return self.index.search(query, c.k, c.mode, sources, self.reranker)

    async def aretrieve(self, query: str) -> list[SearchResult]:
        """Runs in a worker thread: embedding and faiss would otherwise block the loop."""
        return await asyncio.to_thread(self.retrieve, query)
