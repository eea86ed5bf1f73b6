from __future__ import annotations

import numpy as np
import torch

from covey.retrieval.embedder import SMALL_BATCH


def test_vectors_are_normalized_float32(embedder):
    vectors = embedder.embed(["a cat sat on the mat", "quantum chromodynamics"])
    assert vectors.shape == (2, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.embed([]).shape == (0, 384)


def test_small_batches_run_single_threaded_with_same_result(embedder):
    """Queries take the one-thread path; it must not change results or leak the setting."""
    texts = ["how do I open a file", "what is a decorator"] + ["filler text"] * SMALL_BATCH
    threads = torch.get_num_threads()
    small = np.vstack([embedder.embed([t]) for t in texts[:2]])
    big = embedder.embed(texts)[:2]  # > SMALL_BATCH: normal multi-threaded path
    assert torch.get_num_threads() == threads
    assert np.allclose(small, big, atol=1e-5)


def test_length_sorted_embedding_keeps_the_order(embedder):
    from covey.retrieval.length_batching import embed_by_length, length_sorted_slices

    texts = ["short", "a much longer text about rivers and the sea", "mid length text", "x"]
    assert [list(s) for s in length_sorted_slices([len(t) for t in texts], 2)] == [[1, 2], [0, 3]]
    assert embedder.token_counts(texts) == [3, 11, 5, 3]  # [CLS] ... [SEP]
    seen = []
    vectors = embed_by_length(embedder.embed, texts, embedder.dimension, 2, seen.append)
    assert seen == [2, 2]
    np.testing.assert_allclose(vectors, embedder.embed(texts), atol=1e-5)
