"""Embed texts in batches of similar length: a batch is padded to its longest text, so
mixing a 10-token chunk with a 250-token one pays for 250 twice.

sentence-transformers sorts each `encode` call's texts by character count, but only
within the call, and characters are a poor proxy for tokens in code-heavy text (on the
Python docs the two correlate at 0.77). Measured on the Python docs' 711 chunks (133.5k real
tokens, 64-text batches; benchmarks/retrieval.py computes the same counts): fed in
document order, 256 at a time, for sentence-transformers to sort, the model computes over
175.9k tokens, 42.4k of them padding; sorted by the Embedder's own token counts, over
147.1k, 13.5k of them padding (less padding is better). Ingest also sorts each window
before slicing it, so the slices it hands the embedder are already of similar length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def length_sorted_slices(lengths: Sequence[int], size: int) -> list[np.ndarray]:
    """Positions of the items whose `lengths` are given, longest first, in slices of at
    most `size`."""
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
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
    for rows in length_sorted_slices([len(t) for t in texts], size):
        out[rows] = embed([texts[i] for i in rows])
        if on_batch is not None:
            on_batch(len(rows))
    return out
