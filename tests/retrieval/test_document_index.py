from __future__ import annotations

import json

import pytest

from covey.errors import (
    EmbedderMismatchError,
    IndexNotFoundError,
    InvalidRequestError,
    RetrievalError,
)
from covey.retrieval.document_index import DocumentIndex
from covey.retrieval.retriever import Retriever, RetrieverConfig

ERROR_CODES = [
    "Error E4712 is raised when the disk quota is exceeded during upload.",
    "Error E4710 indicates that the network connection timed out.",
    "Error E4713 means the configuration file could not be parsed.",
    "Error E4714 appears when the user lacks permission to write the bucket.",
    "If the cache warms up slowly, increase the number of prefetch workers.",
    "Status code E4711 is returned when the tokenizer vocabulary does not match the checkpoint.",
    "Error E4715 means the server ran out of memory while loading the model.",
    "Error E4716 is logged when a retry budget is exhausted.",
]
TOPICS = {
    "fruit.txt": "Apples and pears grow in orchards. Bananas ripen in warm tropical climates.",
    "space.txt": "The rocket reached orbit. Astronauts docked with the space station.",
    "code.txt": "Call asyncio.gather to run coroutines concurrently in Python programs.",
}


def write_topics(folder):
    folder.mkdir(exist_ok=True)
    for name, text in TOPICS.items():
        (folder / name).write_text(text)
    return folder


def ids(results):
    return [(r.chunk.id, r.chunk.source, round(r.score, 5)) for r in results]


def test_round_trip_gives_identical_results(tmp_path, make_index, embedder, tokenizer):
    index = make_index()
    index.add_files([write_topics(tmp_path / "docs")])
    index.add_texts(ERROR_CODES, source="codes")
    queries = ["space travel", "tropical fruit", "run coroutines", "error E4711"]
    before = {
        (q, m): ids(index.search(q, k=4, mode=m))
        for q in queries
        for m in ("vector", "bm25", "hybrid")
    }
    reopened = DocumentIndex.open(index.root, embedder=embedder, tokenizer=tokenizer)
    after = {
        (q, m): ids(reopened.search(q, k=4, mode=m))
        for q in queries
        for m in ("vector", "bm25", "hybrid")
    }
    assert before == after
    assert reopened.chunks == index.chunks
    assert len(reopened) == len(index) == 3 + len(ERROR_CODES)


def test_search_finds_the_right_topic(tmp_path, make_index):
    index = make_index()
    index.add_files([write_topics(tmp_path / "docs")])
    top = index.search("astronauts in orbit", k=1, mode="vector")[0]
    assert top.chunk.source.endswith("space.txt")
    assert 0 < top.score <= 1.0


def test_hybrid_finds_exact_code_that_vector_search_misses(make_index):
    index = make_index()
    index.add_texts(ERROR_CODES, source="codes")
    query = "what does error E4711 mean"
    vector = [r.chunk.text for r in index.search(query, k=3, mode="vector")]
    hybrid = [r.chunk.text for r in index.search(query, k=3, mode="hybrid")]
    bm25 = [r.chunk.text for r in index.search(query, k=1, mode="bm25")]
    target = ERROR_CODES[5]
    assert target not in vector
    assert target in hybrid
    assert bm25 == [target]


def test_reingest_is_idempotent_and_replaces_changed_files(tmp_path, make_index):
    docs = write_topics(tmp_path / "docs")
    index = make_index()
    first = index.add_files([docs])
    assert first.added_chunks == 3 and first.unchanged == 0
    version = index.manifest["version"]

    again = index.add_files([docs])
    assert (again.added_chunks, again.removed_chunks, again.unchanged) == (0, 0, 3)
    assert index.manifest["version"] == version  # nothing changed, nothing committed
    assert len(index) == 3

    (docs / "space.txt").write_text("Comets have icy nuclei and long glowing tails.")
    changed = index.add_files([docs])
    assert (changed.replaced, changed.removed_chunks, changed.added_chunks) == (1, 1, 1)
    assert len(index) == 3
    space = [c for c in index.chunks if c.source.endswith("space.txt")]
    assert [c.text for c in space] == ["Comets have icy nuclei and long glowing tails."]
    assert not index.search("astronauts docked", k=5, mode="bm25")
    top = index.search("comet tails", k=1)[0]
    assert top.chunk.source.endswith("space.txt")


def test_source_filter_and_removal(tmp_path, make_index):
    index = make_index()
    index.add_files([write_topics(tmp_path / "docs")])
    index.add_texts(["Pears are also a fruit sold in markets."], source="market")
    for mode in ("vector", "bm25", "hybrid"):
        hits = index.search("fruit", k=5, mode=mode, sources=["market"])
        assert [h.chunk.source for h in hits] == ["market"]
    globbed = index.search("fruit", k=5, mode="vector", sources=["*.txt"])
    assert len(globbed) == 3 and all(h.chunk.source.endswith(".txt") for h in globbed)
    assert index.search("fruit", k=5, sources=["nobody"]) == []
    assert index.remove_sources(["market"]) == 1
    assert all(c.source != "market" for c in index.chunks)


def test_reranker_hook_reorders_candidates(tmp_path, make_index):
    index = make_index()
    index.add_files([write_topics(tmp_path / "docs")])
    seen = []

    def prefer_code(query, chunks):
        seen.append(len(chunks))
        return [1.0 if "asyncio" in c.text else 0.0 for c in chunks]

    hits = index.search("fruit", k=2, reranker=prefer_code)
    assert "asyncio" in hits[0].chunk.text and hits[0].score == 1.0
    assert seen == [3] and len(hits) == 2
    with pytest.raises(InvalidRequestError, match="reranker returned 1 scores for 3 chunks"):
        index.search("fruit", k=2, reranker=lambda q, cs: [1.0])


def test_retriever_component(tmp_path, make_index):
    import asyncio

    index = make_index()
    index.add_files([write_topics(tmp_path / "docs")])
    retriever = Retriever(index, RetrieverConfig(k=1, mode="vector"))
    assert retriever.retrieve("rockets")[0].chunk.source.endswith("space.txt")
    hits = asyncio.run(retriever.aretrieve("bananas"))
    assert hits[0].chunk.source.endswith("fruit.txt")
    with pytest.raises(ValueError, match="k must be a positive integer"):
        RetrieverConfig(k=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        RetrieverConfig(mode="fuzzy")


def test_add_texts_names_sources(make_index):
    index = make_index()
    index.add_texts(["alpha one.", "beta two."], source="notes")
    assert sorted(index.sources) == ["notes#0", "notes#1"]
    index.add_texts(["gamma three."])
    assert any(s.startswith("text:") for s in index.sources)
    with pytest.raises(RetrievalError, match="got 1 texts but 2 sources"):
        index.add_texts(["x"], source=["a", "b"])


@pytest.mark.parametrize(
    ("query", "k", "mode", "message"),
    [
        ("", 5, "hybrid", "query must be a non-empty string"),
        ("   ", 5, "vector", "query must be a non-empty string"),
        ("ok", 0, "hybrid", "k must be a positive integer, got 0"),
        ("ok", -3, "bm25", "k must be a positive integer, got -3"),
        ("ok", 5, "fuzzy", "mode must be one of vector, bm25, hybrid; got 'fuzzy'"),
    ],
)
def test_bad_requests(make_index, query, k, mode, message):
    index = make_index()
    with pytest.raises(InvalidRequestError, match=message):
        index.search(query, k=k, mode=mode)


def test_empty_index_returns_nothing(make_index):
    assert make_index().search("anything", k=3) == []


def test_missing_index_is_a_clear_error(tmp_path):
    with pytest.raises(IndexNotFoundError, match="no index at .*missing manifest.json"):
        DocumentIndex.open(tmp_path / "nowhere")


def test_create_over_existing_index_is_an_error(make_index):
    index = make_index()
    with pytest.raises(RetrievalError, match="an index already exists"):
        DocumentIndex.create(index.root, embedder=index.embedder, tokenizer=index.tokenizer)


def test_other_embedder_is_a_mismatch(make_index):
    index = make_index()

    class OtherEmbedder:
        name = "other-model"
        dimension = 768

        def embed(self, texts):
            raise AssertionError("must not be called")

    with pytest.raises(EmbedderMismatchError, match="built with embedder 'all-MiniLM-L6-v2'"):
        DocumentIndex.open(index.root, embedder=OtherEmbedder())


def test_manifest_records_embedder_and_tokenizer(make_index):
    index = make_index()
    manifest = json.loads((index.root / "manifest.json").read_text())
    assert manifest["embedder"]["name"] == "all-MiniLM-L6-v2"
    assert manifest["embedder"]["dimension"] == 384
    assert manifest["chunker"]["tokenizer"] == "all-MiniLM-L6-v2"
    assert manifest["version"] == "v000001"


def test_concurrent_writer_is_detected(make_index, embedder, tokenizer):
    index = make_index()
    other = DocumentIndex.open(index.root, embedder=embedder, tokenizer=tokenizer)
    index.add_texts(["first writer wins."], source="a")
    with pytest.raises(RetrievalError, match="changed by another writer"):
        other.add_texts(["second writer loses."], source="b")
    # the failed writer reloaded the latest commit, so a retry now succeeds
    assert [c.source for c in other.chunks] == ["a"]
    other.add_texts(["second writer retries."], source="b")
    reopened = DocumentIndex.open(index.root, embedder=embedder, tokenizer=tokenizer)
    assert [c.source for c in reopened.chunks] == ["a", "b"]


def test_other_chunking_tokenizer_is_warned_about(make_index, embedder, caplog):
    from covey.retrieval.tokenizers import WhitespaceTokenizer

    index = make_index()
    reopened = DocumentIndex.open(index.root, embedder=embedder, tokenizer=WhitespaceTokenizer())
    reopened.add_texts(["counted in words now."], source="w")
    assert "chunked with tokenizer 'all-MiniLM-L6-v2', now chunking with 'whitespace'" in (
        caplog.text
    )
