"""The three search modes over one DocumentIndex, metadata filters and the rerank hook."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from covey.errors import InvalidRequestError
from covey.retrieval.bm25_index import top_k
from covey.retrieval.documents import Chunk, SearchResult
from covey.retrieval.rank_fusion import reciprocal_rank_fusion
from covey.retrieval.searcher import MODES as MODES  # defined and checked there; re-exported
from covey.retrieval.searcher import check_k, check_mode
from covey.retrieval.vector_index import search_index

if TYPE_CHECKING:
    from covey.retrieval.document_index import DocumentIndex

# A reranker scores (query, candidate chunks), higher is better; e.g. a cross-encoder.
Reranker = Callable[[str, list[Chunk]], Sequence[float]]
# Each ranking that hybrid fuses, and a reranker, sees this many candidates per result.
CANDIDATES_PER_RESULT = 4
MIN_CANDIDATES = 20


def validate_request(query: str, k: object, mode: object) -> tuple[int, str]:
    """The query must have text; k and mode go through the searcher's one check each.
    Returns (k, mode) as checked (a numpy integer k becomes an int)."""
    if not isinstance(query, str) or not query.strip():
        raise InvalidRequestError("query must be a non-empty string")
    return check_k(k), check_mode(mode)


class SearchEngine:
    """One search over a DocumentIndex's current state; holds no state of its own."""

    def __init__(self, index: DocumentIndex) -> None:
        self.index = index

    def search(
        self,
        query: str,
        k: int,
        mode: str,
        sources: Sequence[str] | None,
        reranker: Reranker | None,
    ) -> list[SearchResult]:
        k, mode = validate_request(query, k, mode)
        if not self.index.chunks:
            return []
        allowed = self._source_mask(sources)
        wanted = max(k * CANDIDATES_PER_RESULT, MIN_CANDIDATES) if reranker else k
        if mode == "vector":
            ranked = self._vector(query, wanted, allowed)
        elif mode == "bm25":
            ranked = self._bm25(query, wanted, allowed)
        else:
            ranked = self._hybrid(query, wanted, allowed)
        if reranker is not None:
            ranked = self._rerank(query, ranked, reranker)
        chunks = self.index.chunks
        return [SearchResult(chunks[pos], float(score)) for pos, score in ranked[:k]]

    def _source_mask(self, sources: Sequence[str] | None) -> np.ndarray | None:
        """Bool mask of chunks whose source equals, or glob-matches, one of `sources`."""
        if sources is None:
            return None
        if isinstance(sources, str):
            sources = [sources]
        patterns = [s for s in sources if any(ch in s for ch in "*?[")]
        exact = set(sources) - set(patterns)
        names = {
            name
            for name in self.index.sources
            if name in exact or any(fnmatch.fnmatchcase(name, p) for p in patterns)
        }
        return np.array([c.source in names for c in self.index.chunks], dtype=bool)

    def _vector(self, query: str, k: int, allowed: np.ndarray | None) -> list[tuple[int, float]]:
        q = self.index.embedder.embed([query])  # [1, d]
        if allowed is None:
            scores, ids = search_index(self.index.faiss_index(), q, k)
            return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]
        # Filtered: exact scoring of the allowed rows only, so a filter never loses recall.
        rows = np.flatnonzero(allowed)
        if rows.size == 0:
            return []
        sims = self.index.vectors[rows] @ q[0]  # [rows]
        order = np.argsort(-sims, kind="stable")[:k]
        return [(int(rows[i]), float(sims[i])) for i in order]

    def _bm25(self, query: str, k: int, allowed: np.ndarray | None) -> list[tuple[int, float]]:
        scores = self.index.bm25().scores(query)
        return [(pos, float(scores[pos])) for pos in top_k(scores, k, allowed)]

    def _hybrid(self, query: str, k: int, allowed: np.ndarray | None) -> list[tuple[int, float]]:
        depth = max(k * CANDIDATES_PER_RESULT, MIN_CANDIDATES)
        vector = [pos for pos, _ in self._vector(query, depth, allowed)]
        keyword = [pos for pos, _ in self._bm25(query, depth, allowed)]
        return reciprocal_rank_fusion([vector, keyword])[:k]

    def _rerank(
        self, query: str, ranked: list[tuple[int, float]], reranker: Reranker
    ) -> list[tuple[int, float]]:
        candidates = [self.index.chunks[pos] for pos, _ in ranked]
        scores = list(reranker(query, candidates))
        if len(scores) != len(candidates):
            raise InvalidRequestError(
                f"reranker returned {len(scores)} scores for {len(candidates)} chunks"
            )
        order = sorted(range(len(ranked)), key=lambda i: -float(scores[i]))
        return [(ranked[i][0], float(scores[i])) for i in order]
