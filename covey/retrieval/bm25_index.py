"""BM25 keyword scoring (bm25s) beside the vectors: it finds exact tokens such as error
codes and identifiers that embeddings blur. Built in memory from the chunk texts."""

from __future__ import annotations

import numpy as np


def tokenize_query(query: str) -> list[str]:
    import bm25s

    return bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)[0]


class BM25Index:
    """Scores every chunk for a query; positions match the vector rows."""

    def __init__(self, texts: list[str]) -> None:
        import bm25s

        self.size = len(texts)
        self._bm25 = bm25s.BM25()
        if texts:
            tokens = bm25s.tokenize(texts, stopwords="en", show_progress=False)
            self._bm25.index(tokens, show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        """[size] float32 BM25 scores; all zero when no query term is in the corpus."""
        if self.size == 0:
            return np.zeros(0, dtype=np.float32)
        terms = tokenize_query(query)
        if not terms:
            return np.zeros(self.size, dtype=np.float32)
        return np.asarray(self._bm25.get_scores(terms), dtype=np.float32)


def top_k(scores: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[int]:
    """Positions of the k best positive scores, best first; `allowed` is a bool mask."""
    if allowed is not None:
        scores = np.where(allowed, scores, 0.0)
    positive = np.flatnonzero(scores > 0)
    if positive.size == 0:
        return []
    k = min(k, positive.size)
    best = positive[np.argpartition(-scores[positive], k - 1)[:k]]
    return [int(i) for i in best[np.argsort(-scores[best], kind="stable")]]
