from __future__ import annotations

import numpy as np
import pytest

from covey.errors import ConfigError
from covey.retrieval.vector_index import (
    IndexConfig,
    build_index,
    exact_search,
    measure_recall,
    recall_at_k,
    search_index,
)
from tests.retrieval.vectors import clustered_vectors


@pytest.fixture(scope="module")
def corpus():
    data = clustered_vectors(6000, seed=1)
    queries = clustered_vectors(200, seed=1)  # same centres, fresh noise: unseen queries
    return data, queries


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_recall_at_10(corpus, kind):
    data, queries = corpus
    index = build_index(data, kind, IndexConfig(kind=kind))
    truth = exact_search(data, queries, 10)
    _, found = search_index(index, queries, 10)
    assert recall_at_k(found, truth) >= 0.95
    assert measure_recall(index, data) >= 0.95


def test_flat_is_exact(corpus):
    data, queries = corpus
    index = build_index(data, "flat", IndexConfig(kind="flat"))
    _, found = search_index(index, queries, 10)
    assert recall_at_k(found, exact_search(data, queries, 10)) == 1.0


def test_recall_measures_misses():
    truth = np.array([[1, 2, 3, 4]])
    assert recall_at_k(np.array([[1, 2, 9, -1]]), truth) == 0.5


def test_search_clamps_k_to_size():
    data = clustered_vectors(3)
    scores, ids = search_index(build_index(data, "flat", IndexConfig()), data[:1], 10)
    assert ids.shape == (1, 3) and ids[0, 0] == 0 and scores[0, 0] == pytest.approx(1.0)


def test_auto_kind_switches_at_threshold():
    config = IndexConfig(auto_threshold=100)
    assert config.resolve_kind(99) == "flat"
    assert config.resolve_kind(100) == "hnsw"
    assert IndexConfig(kind="ivf").resolve_kind(1) == "ivf"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kind": "lsh"}, "kind"),
        ({"nprobe": 0}, "nprobe"),
        ({"hnsw_m": -1}, "hnsw_m"),
        ({"ef_search": 0}, "ef_search"),
        ({"auto_threshold": 0}, "auto_threshold"),
        ({"nlist": 0}, "nlist"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        IndexConfig(**kwargs)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_document_index_with_approximate_kind(make_index, embedder, tokenizer, kind):
    """Persisted approximate indexes reopen from their faiss file with recall recorded."""
    from covey.retrieval.document_index import DocumentIndex

    index = make_index(index=IndexConfig(kind=kind))
    texts = [f"Note {i}: item {i * 7919 % 1000} belongs to shelf {i % 13}." for i in range(120)]
    index.add_texts(texts, source="inventory")
    assert index.manifest["index"]["kind"] == kind
    assert index.manifest["index"]["recall_at_10"] >= 0.95
    version_dir = index.root / "versions" / index.manifest["version"]
    assert (version_dir / "index.faiss").is_file()
    reopened = DocumentIndex.open(index.root, embedder=embedder, tokenizer=tokenizer)
    query = "which shelf holds item 919"
    assert [r.chunk.id for r in reopened.search(query, k=5, mode="vector")] == [
        r.chunk.id for r in index.search(query, k=5, mode="vector")
    ]
