"""Checkpointed ingest, in process: an ingest interrupted after a checkpoint (Ctrl-C in
the middle of embedding) leaves a consistent version in which every chunk belongs to a
complete source or to one marked partial, and a replaced document keeps its old text until
its new chunks go in. Checkpoints trigger on chunk counts and on time."""

from __future__ import annotations

import json

import pytest

from covey.errors import RetrievalError
from covey.retrieval import document_index
from covey.retrieval.chunker import ChunkerConfig
from covey.retrieval.document_index import DocumentIndex
from covey.retrieval.documents import Document, content_hash
from covey.retrieval.index_health import repair_index, verify_index

CHECKPOINT = 4


class CtrlCAfter:
    """The real embedder, interrupted (KeyboardInterrupt) on its `calls`-th embed call."""

    def __init__(self, embedder, calls: int) -> None:
        self.real, self.calls = embedder, calls
        self.name, self.dimension = embedder.name, embedder.dimension

    def embed(self, texts):
        self.calls -= 1
        if self.calls == 0:
            raise KeyboardInterrupt
        return self.real.embed(texts)


def long_doc(source: str, word: str) -> Document:
    return Document(" ".join(f"{word} note {i} is distinct." for i in range(40)), source)


@pytest.fixture
def small(make_index):
    return make_index(chunker=ChunkerConfig(chunk_tokens=24, overlap_tokens=4))


def interrupted(index, embedder, tokenizer, docs) -> DocumentIndex:
    """Ingest `docs` until the second embed call, then reopen what the checkpoint holds."""
    writer = DocumentIndex.open(index.root, tokenizer=tokenizer)
    writer._embedder = CtrlCAfter(embedder, 2)
    with pytest.raises(KeyboardInterrupt):
        writer.add_documents(docs, checkpoint_chunks=CHECKPOINT)
    return DocumentIndex.open(index.root, embedder=embedder, tokenizer=tokenizer)


def test_another_ingest_keeps_an_interrupted_sources_partial_marker(small, embedder, tokenizer):
    x = long_doc("x.txt", "heron")
    survivor = interrupted(small, embedder, tokenizer, [x])
    held = survivor.partial["x.txt"]["chunks"]
    assert 0 < held == len(survivor) and "x.txt" not in survivor.sources

    survivor.add_texts(["Yaks graze on high plateaus."], source="y.txt")  # Y alone
    reopened = DocumentIndex.open(small.root, embedder=embedder, tokenizer=tokenizer)
    assert reopened.partial == {"x.txt": {"content_hash": content_hash(x.text), "chunks": held}}
    report = verify_index(small.root)
    assert report.problems == 0
    assert f"holds the first {held} chunks of x.txt" in "\n".join(report.lines)
    assert reopened.remove_sources(["x.txt"]) == held
    assert {c.source for c in reopened.chunks} == {"y.txt"} and reopened.partial == {}


def test_chunks_without_a_source_or_marker_are_found_and_recorded(small, embedder, tokenizer):
    """What an older covey left after the interrupted-X-then-Y sequence: X's chunks with
    neither a sources entry nor a partial marker."""
    survivor = interrupted(small, embedder, tokenizer, [long_doc("x.txt", "heron")])
    held = len(survivor)
    folder = small.root / "versions" / survivor.manifest["version"]
    for path in (folder / "version.json", small.root / "manifest.json"):
        record = json.loads(path.read_text())
        del record["partial"]
        path.write_text(json.dumps(record))

    opened = DocumentIndex.open(small.root, embedder=embedder, tokenizer=tokenizer)
    assert any("x.txt (" in w and "kept as partial" in w for w in opened.warnings)
    assert opened.partial["x.txt"]["chunks"] == held  # so that removing it works
    report = verify_index(small.root)
    assert report.problems == 1 and "chunks of unfinished, unmarked sources: x.txt" in (
        "\n".join(report.lines)
    )
    assert any("recorded as partial" in line for line in repair_index(small.root).lines)
    assert verify_index(small.root).problems == 0
    repaired = DocumentIndex.open(small.root, embedder=embedder, tokenizer=tokenizer)
    assert repaired.warnings == [] and repaired.partial["x.txt"]["chunks"] == held

    repaired.sources.pop("x.txt", None)
    repaired.partial.clear()  # an unaccounted chunk is never committed
    with pytest.raises(RetrievalError, match=r"neither complete nor partial: \['x.txt'\]"):
        repaired.commit()


def test_checkpoints_keep_a_replaced_document_until_its_new_chunks_go_in(
    small, embedder, tokenizer
):
    small.add_texts(["Apples grow in orchards.", "Bread rises."], source=["a.txt", "b.txt"])
    old_a = [c.id for c in small.chunks if c.source == "a.txt"]
    new_a = Document("Apples and pears grow in sunny orchards in autumn.", "a.txt")
    c = long_doc("c.txt", "lynx")  # comes first: checkpoints commit before a.txt is reached
    survivor = interrupted(small, embedder, tokenizer, [c, new_a])
    assert survivor.partial["c.txt"]["chunks"] > 0
    assert survivor.sources["a.txt"] == small.sources["a.txt"]  # the old digest, old text
    assert [ch.id for ch in survivor.chunks if ch.source == "a.txt"] == old_a
    hit = survivor.search("apples orchards", k=1, mode="bm25")[0]
    assert hit.chunk.source == "a.txt"

    stats = survivor.add_documents([c, new_a], checkpoint_chunks=CHECKPOINT)
    assert (stats.replaced, stats.removed_chunks) == (1, len(old_a))
    final = DocumentIndex.open(small.root, embedder=embedder, tokenizer=tokenizer)
    assert final.sources["a.txt"] == content_hash(new_a.text) and final.partial == {}
    assert "pears" in " ".join(ch.text for ch in final.chunks if ch.source == "a.txt")


def test_time_triggers_checkpoints(small, monkeypatch):
    monkeypatch.setattr(document_index, "WINDOW_CHUNKS", 5)
    doc = long_doc("t.txt", "ibis")
    untimed = small.add_documents([doc], checkpoint_chunks=10_000, checkpoint_seconds=None)
    n = len(small)
    assert n > 10 and untimed.checkpoints == 0
    small.remove_sources(["t.txt"])
    timed = small.add_documents([doc], checkpoint_chunks=10_000, checkpoint_seconds=1e-9)
    assert timed.checkpoints == (n - 1) // 5  # one after every window but the last
    for kwargs, message in (
        ({"checkpoint_chunks": 0}, "checkpoint_chunks must be > 0, got 0"),
        ({"checkpoint_seconds": 0}, "checkpoint_seconds must be > 0 or None, got 0"),
    ):
        with pytest.raises(RetrievalError, match=message):
            small.add_documents([doc], **kwargs)
