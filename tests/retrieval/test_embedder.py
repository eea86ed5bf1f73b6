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
    direct = embedder.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(vectors, direct, atol=1e-5)


def test_one_batch_is_not_tokenized_twice(embedder, monkeypatch):
    """Texts that fit one batch (every search query) skip the token counting that only
    orders several batches; more texts are ordered by it, and both match the model."""
    counted = []
    real = embedder.token_counts

    def token_counts(texts):
        counted.append(texts)
        return real(texts)

    monkeypatch.setattr(embedder, "token_counts", token_counts)
    monkeypatch.setattr(embedder, "batch_size", 3)
    texts = ["a query about files", "a much longer query about opening files in Python", "x"]
    direct = embedder.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(embedder.embed(texts), direct, atol=1e-5)
    np.testing.assert_allclose(embedder.embed(texts[:1]), direct[:1], atol=1e-5)
    assert counted == []
    more = texts + ["four", "five words in this one"]
    vectors = embedder.embed(more)
    assert counted == [more]
    direct = embedder.model.encode(more, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(vectors, direct, atol=1e-5)
