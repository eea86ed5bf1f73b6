from __future__ import annotations

import pytest

from covey.errors import InvalidRequestError
from covey.retrieval.default_corpus import (
    default_index_dir,
    ensure_default_index,
    pydoc_documents,
)


def test_default_location_follows_covey_home(monkeypatch, tmp_path):
    monkeypatch.setenv("COVEY_HOME", str(tmp_path))
    assert default_index_dir() == tmp_path / "indexes" / "pydocs"
    monkeypatch.delenv("COVEY_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert default_index_dir() == tmp_path / "user" / ".cache" / "covey" / "indexes" / "pydocs"


def test_pydoc_documents_are_cpython_topics():
    docs = pydoc_documents()
    assert len(docs) > 50
    names = {d.source for d in docs}
    assert {"pydoc:for", "pydoc:try", "pydoc:assert"} <= names
    assert [d.source for d in pydoc_documents(limit=2)] == ["pydoc:assert", "pydoc:assignment"]
    with pytest.raises(InvalidRequestError, match="limit must be > 0"):
        pydoc_documents(limit=0)


def test_built_once_then_opened(tmp_path, embedder, tokenizer, capsys):
    root = tmp_path / "pydocs"
    first = ensure_default_index(root, limit=2, embedder=embedder, tokenizer=tokenizer)
    assert "building the Python docs index" in capsys.readouterr().out
    assert sorted(first.sources) == ["pydoc:assert", "pydoc:assignment"]
    hit = first.search("starred assignment target list", k=1)[0]
    assert hit.chunk.source == "pydoc:assignment"
    again = ensure_default_index(root, limit=2, embedder=embedder, tokenizer=tokenizer)
    assert "building" not in capsys.readouterr().out
    assert again.manifest["version"] == first.manifest["version"]
    assert again.chunks == first.chunks
