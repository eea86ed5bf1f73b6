"""Retriever: a `Searcher` with fixed settings over one DocumentIndex: its k, mode and
source filter, and optionally a reranker. Bound to a `retrieve` node, it searches with its
own settings unless the node gives k or mode explicitly."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from covey.retrieval.document_index import DocumentIndex
from covey.retrieval.documents import SearchResult
from covey.retrieval.search import Reranker
from covey.retrieval.searcher import DEFAULT_K, DEFAULT_MODE, check_k, check_mode


@dataclass(frozen=True)
class RetrieverConfig:
    k: int = DEFAULT_K
    mode: str = DEFAULT_MODE
    sources: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", check_k(self.k))
        object.__setattr__(self, "mode", check_mode(self.mode))


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

    def search(
        self,
        query: str,
        k: int | None = None,
        mode: str | None = None,
        sources: Sequence[str] | None = None,
    ) -> list[SearchResult]:
        """The best chunks for `query`; None keeps the config's k, mode and sources."""
        k = k if k is not None else self.config.k
        mode = mode if mode is not None else self.config.mode
        if sources is None and self.config.sources is not None:
            sources = list(self.config.sources)
        return self.index.search(query, k, mode, sources, self.reranker)

    def retrieve(self, query: str) -> list[SearchResult]:
        """Search with the config's settings."""
        return self.search(query)

    async def aretrieve(self, query: str) -> list[SearchResult]:
        """Runs in a worker thread: embedding and faiss would otherwise block the loop."""
        return await asyncio.to_thread(self.retrieve, query)
