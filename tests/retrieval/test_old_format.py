"""Indexes written by the covey before version records (commit cdb4045's store: a manifest
naming the current version, version folders without version.json, the previous version
kept) must keep opening, searching and taking commits. Users' default Python-docs index is
one. data/old_format holds two folders that covey wrote (kept byte for byte): `pydocs`, by
its ensure_default_index (v000001 empty, v000002 two topics), and `hnsw`, two commits of
four notes with an HNSW index file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from covey.cli import main as cli_main
from covey.errors import RetrievalError
from covey.retrieval.document_index import DocumentIndex
from covey.retrieval.index_health import repair_index, verify_index

OLD = Path(__file__).parent / "data" / "old_format"


def copy_old(name: str, to: Path) -> Path:
    shutil.copytree(OLD / name, to)
    assert not list(to.glob("versions/*/version.json"))  # really the old format
    return to


def test_the_default_index_written_by_the_previous_covey_still_opens(
    tmp_path, monkeypatch, capsys, embedder, tokenizer
):
    monkeypatch.setenv("COVEY_HOME", str(tmp_path / "home"))
    root = copy_old("pydocs", tmp_path / "home" / "indexes" / "pydocs")
    # Opened as it is (ensure_default_index updates its corpus: test_default_corpus).
    index = DocumentIndex.open(root, embedder=embedder, tokenizer=tokenizer)
    assert index.warnings == [] and index.manifest["version"] == "v000002"
    assert sorted(index.sources) == ["pydoc:assert", "pydoc:assignment"] and len(index) == 18
    for mode in ("vector", "bm25", "hybrid"):
        assert index.search("assert statement", k=1, mode=mode)[0].chunk.source == "pydoc:assert"

    monkeypatch.setattr(cli_main, "SUBCOMMAND_MODULES", ("covey.cli.retrieval_commands",))
    argv = ["search", "starred assignment target list", "-k", "1", "--index", str(root)]
    assert cli_main.main(argv) == 0
    out, err = capsys.readouterr()
    assert "pydoc:assignment" in out and "warning" not in err

    report = verify_index(root)
    assert report.problems == 0, report.lines
    assert report.lines[:2] == [
        "manifest.json: ok (names v000002)",
        "v000002 (newest): 18 chunks from 2 sources, faiss flat (written by an older covey: "
        "its record is manifest.json): ok",
    ]
    assert repair_index(root).lines == [
        "nothing to repair: v000002 and manifest.json are intact"
    ]

    # The next commit writes the new format on top and collects what v000002 superseded.
    index.add_texts(["Volcanoes erupt when magma rises."], source="notes")
    assert sorted(p.name for p in (root / "versions").iterdir()) == ["v000002", "v000003"]
    assert (root / "versions" / "v000003" / "version.json").is_file()
    again = DocumentIndex.open(root, embedder=embedder, tokenizer=tokenizer)
    assert again.warnings == [] and len(again) == 19 and verify_index(root).problems == 0


def test_old_index_with_an_interrupted_commit_is_served_and_repaired(
    tmp_path, embedder, tokenizer
):
    """The old covey renamed a version into place before writing the manifest: a crash
    between the two left a complete folder newer than the manifest's, without a record."""
    root = copy_old("hnsw", tmp_path / "idx")
    before = DocumentIndex.open(root, embedder=embedder, tokenizer=tokenizer)
    assert before.warnings == [] and before._faiss is not None  # the stored HNSW file
    want = [(r.chunk.id, round(r.score, 4)) for r in before.search("yeast dough", k=3)]
    shutil.copytree(root / "versions" / "v000003", root / "versions" / "v000004")

    index = DocumentIndex.open(root, embedder=embedder, tokenizer=tokenizer)
    assert index.manifest["version"] == "v000003"
    assert any("v000004 is newer than v000003" in w for w in index.warnings), index.warnings
    with pytest.raises(RetrievalError, match="refusing to commit on top of v000003"):
        index.add_texts(["Glaciers carve valleys."], source="ice")
    assert verify_index(root).problems > 0

    report = repair_index(root, embedder=embedder, tokenizer=tokenizer)
    assert report.lines[-1] == "committed v000005 (4 chunks)", report.lines
    assert any("v000004: version.json: missing; rebuilt from the data files" in line
               for line in report.lines), report.lines
    repaired = DocumentIndex.open(root, embedder=embedder, tokenizer=tokenizer)
    assert repaired.warnings == [] and verify_index(root).problems == 0
    assert [(r.chunk.id, round(r.score, 4)) for r in repaired.search("yeast dough", k=3)] == want


def test_old_index_without_its_manifest_says_what_to_do(tmp_path, capsys):
    root = copy_old("hnsw", tmp_path / "idx")
    (root / "manifest.json").unlink()
    with pytest.raises(RetrievalError) as info:
        DocumentIndex.open(root)
    message = str(info.value)
    assert "no folder in" in message and "(v000002, v000003) has a usable version.json" in message
    assert "an index written by an older covey" in message
    assert f"move {root} aside and rebuild the index from its sources" in message
    assert "holds no committed version" not in message
    report = verify_index(root)  # lists the folders instead of "no index"
    assert report.lines[0] == "manifest.json: missing"
    assert report.lines[1] == (
        "v000003 (newest): version.json: missing (no version has a record: none is served)"
    )
    with pytest.raises(RetrievalError, match="no manifest.json or version.json says which"):
        repair_index(root)

    # With any record left (here: the manifest), the same folders are rebuilt and restored.
    record = json.loads((OLD / "hnsw" / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps(dict(record, version="v000002")))
    report = repair_index(root)
    assert report.lines[-1] == "committed v000004 (4 chunks)", report.lines
