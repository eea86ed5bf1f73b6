"""Reciprocal rank fusion: combine rankings whose scores are not comparable (cosine vs BM25)
by rank alone, as in Cormack et al. 2009; k=60 damps the weight of the very top ranks."""

from __future__ import annotations

from covey.errors import InvalidRequestError

RRF_K = 60


def reciprocal_rank_fusion(rankings: list[list[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """(item, fused score) best first; an item scores sum(1 / (k + rank)) over the lists
    it appears in (rank from 1). Ties keep first-seen order, so fusion is deterministic."""
    if k < 0:
        raise InvalidRequestError(f"reciprocal rank fusion: k must be >= 0, got {k}")
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda kv: -kv[1])
