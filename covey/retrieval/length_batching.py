"""Embed texts in batches of similar length: a batch is padded to its longest text, so
mixing a 10-token chunk with a 250-token one pays for 250 twice.

sentence-transformers already sorts each `encode` call's texts by length, but only within
the call; ingest used to call it on consecutive slices in document order, so every slice
mixed the long body chunks with the short last chunk of each document. Sorting the whole
window first makes each slice (and so each model batch) nearly uniform in length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def length_sorted_slices(texts: Sequence[str], size: int) -> list[np.ndarray]:
    """Positions of `texts`, longest first, cut into slices of at most `size`."""
    order = np.argsort([-len(t) for t in texts], kind="stable")
    return [order[i : i + size] for i in range(0, len(order), size)]


def embed_by_length(
    embed: Callable[[list[str]], np.ndarray],
    texts: Sequence[str],
    dimension: int,
    size: int,
    on_batch: Callable[[int], object] | None = None,
) -> np.ndarray:
    """[len(texts), dimension] vectors in the order of `texts`, embedded `size` at a time
    in length order; `on_batch(n)` is called after each slice (a progress bar)."""
    out = np.zeros((len(texts), dimension), dtype=np.float32)
    for rows in length_sorted_slices(texts, size):
        out[rows] = embed([texts[i] for i in rows])
        if on_batch is not None:
            on_batch(len(rows))
    return out
