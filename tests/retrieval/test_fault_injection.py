"""Fault injection over a real index folder: every file an index holds (manifest, version
record, chunk store, vectors, faiss index, lock) x every damage (deleted, empty, truncated, garbage,
swapped with the previous version's, extra rows).

Opening and searching must either recover and answer exactly as the undamaged index did,
with a warning naming the file, or raise a RetrievalError naming the file. Never a silent
wrong answer; and the next commit (or --repair) never removes a version it did not
supersede. One tiny index (the real embedder, a few short documents, HNSW so that a faiss
file exists) is built per module and copied per case.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sqlite3

import faiss
import numpy as np
import pytest

from covey.errors import RetrievalError
from covey.retrieval import store
from covey.retrieval.chunker import ChunkerConfig
from covey.retrieval.document_index import DocumentIndex
from covey.retrieval.index_health import repair_index, verify_index
from covey.retrieval.vector_index import IndexConfig

FIRST = {
    "space": "The rocket reached orbit. Astronauts docked with the space station.",
    "fruit": "Apples and pears grow in orchards. Bananas ripen in warm climates.",
}
SECOND = {
    "bread": "Bread dough rises because yeast makes carbon dioxide gas.",
    "code": "Call asyncio.gather to run coroutines concurrently in Python.",
    "sea": "Tides follow the moon; the ocean rises and falls twice a day.",
}
QUERIES = ("rocket in orbit", "why does dough rise", "run coroutines at once")
MODES = ("vector", "bm25", "hybrid")
DAMAGES = ("deleted", "empty", "truncated", "garbage", "swapped", "extra_rows")
FILES = {
    "manifest": "manifest.json",
    "record": "versions/v000003/version.json",
    "sqlite": "versions/v000003/chunks.sqlite",
    "vectors": "versions/v000003/vectors.npy",
    "faiss": "versions/v000003/index.faiss",
    "lock": ".lock",
}


def results(index: DocumentIndex) -> dict:
    return {
        (q, m): [(r.chunk.id, r.score) for r in index.search(q, k=3, mode=m)]
        for q in QUERIES
        for m in MODES
    }


def assert_same_results(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert [i for i, _ in got[key]] == [i for i, _ in want[key]], key
        np.testing.assert_allclose([s for _, s in got[key]], [s for _, s in want[key]], atol=1e-4)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, embedder, tokenizer):
    """v000002 (first commit of data) and v000003 (current); v000001 was collected."""
    root = tmp_path_factory.mktemp("fault") / "idx"
    index = DocumentIndex.create(
        root,
        embedder=embedder,
        tokenizer=tokenizer,
        chunker=ChunkerConfig(chunk_tokens=64, overlap_tokens=8),
        index=IndexConfig(kind="hnsw"),
    )
    index.add_texts(list(FIRST.values()), source=list(FIRST))
    previous = results(index)
    index.add_texts(list(SECOND.values()), source=list(SECOND))
    assert sorted(p.name for p in (root / "versions").iterdir()) == ["v000002", "v000003"]
    return root, results(index), previous, len(index)


def damage(root, file: str, how: str) -> None:
    path = root / FILES[file]
    previous = root / FILES[file].replace("v000003", "v000002")
    data = path.read_bytes()
    if how == "deleted":
        path.unlink()
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":  # 4 KB of noise over the body, the header left in place
        path.write_bytes(data[:64] + np.random.default_rng(0).bytes(4096))
    elif how == "swapped":
        if file == "manifest":  # the manifest as the previous commit left it
            record = json.loads((root / "versions/v000002/version.json").read_text())
            path.write_text(json.dumps(record))
        elif file == "lock":  # no lock per version: the lock's worst case, a directory
            path.unlink()
            path.mkdir()
        else:
            shutil.copyfile(previous, path)
    elif how == "extra_rows":
        add_rows(path, file, data)


def add_rows(path, file: str, data: bytes) -> None:
    if file in ("manifest", "record"):
        manifest = json.loads(data)
        path.write_text(json.dumps(dict(manifest, num_chunks=manifest["num_chunks"] + 3)))
    elif file == "sqlite":
        con = sqlite3.connect(path)
        con.execute("INSERT INTO chunks VALUES (99, 'x', 'stray', 0, 5, 2, 'stray')")
        con.commit()
        con.close()
    elif file == "vectors":
        vectors = np.load(path)
        np.save(path, np.concatenate([vectors, vectors[:3]]))
    elif file == "faiss":
        index = faiss.read_index(str(path))
        index.add(np.eye(1, index.d, dtype=np.float32).repeat(3, axis=0))
        faiss.write_index(index, str(path))
    else:
        path.write_text("pid 1\npid 2\npid 3\n")


# What opening does per file: recover (with a warning naming the file) or raise naming it.
RECOVERS = {
    "manifest": True,
    "record": True,  # manifest.json holds a copy of the current version's record
    "sqlite": False,
    "vectors": True,
    "faiss": True,
    "lock": True,
}


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("file", list(FILES))
def test_damage_is_recovered_or_named(
    file, how, pristine, tmp_path, embedder, tokenizer, caplog
):
    source, want, previous, n = pristine
    root = tmp_path / "idx"
    shutil.copytree(source, root)
    damage(root, file, how)
    name = os.path.basename(FILES[file])
    caplog.set_level(logging.WARNING, logger="covey.retrieval")

    if not RECOVERS[file]:
        with pytest.raises(RetrievalError, match=rf"{name} is damaged: .*covey index --repair"):
            DocumentIndex.open(root, embedder=embedder, tokenizer=tokenizer)
        assert verify_index(root).problems > 0
        report = repair_index(root, embedder=embedder, tokenizer=tokenizer)
        assert any("restored v000002" in line for line in report.lines), report.lines
        repaired = DocumentIndex.open(root, embedder=embedder, tokenizer=tokenizer)
        assert repaired.warnings == [] and verify_index(root).problems == 0
        assert_same_results(results(repaired), previous)  # said so: v000003 was lost
        return

    index = DocumentIndex.open(root, embedder=embedder, tokenizer=tokenizer)
    assert_same_results(results(index), want)
    assert len(index) == n
    if file == "lock":  # never read: nothing to recover, nothing to warn about
        assert index.warnings == [] and verify_index(root).problems == 0
    else:
        assert index.warnings and all(name in w for w in index.warnings), index.warnings
        assert name in caplog.text
        assert verify_index(root).problems > 0

    if file == "lock" and how == "swapped":  # a directory where the lock file goes
        with pytest.raises(RetrievalError, match=r"cannot open the lock file .*\.lock"):
            index.add_texts(["Glaciers carve valleys."], source="ice")
        assert sorted(p.name for p in (root / "versions").iterdir()) == ["v000002", "v000003"]
        return
    # The next commit writes a consistent version on top of the newest one, keeps that one
    # as its previous, and only collects what the newest one superseded.
    index.add_texts(["Glaciers carve valleys."], source="ice")
    assert sorted(p.name for p in (root / "versions").iterdir()) == ["v000003", "v000004"]
    reopened = DocumentIndex.open(root, embedder=embedder, tokenizer=tokenizer)
    assert reopened.warnings == [] and len(reopened) == n + 1
    assert reopened.search("glacier valleys", k=1)[0].chunk.source == "ice"
    assert verify_index(root).problems == 0
    if file == "lock":  # the damaged lock was replaced by a plain file that still excludes
        assert (root / ".lock").is_file() and not store._writer_active(root)
        with store.commit_lock(root):  # what a second writer would wait on
            assert store._writer_active(root)
        assert not store._writer_active(root)


def test_repair_restores_vectors_and_faiss_without_loss(pristine, tmp_path, embedder, tokenizer):
    source, want, _, n = pristine
    root = tmp_path / "idx"
    shutil.copytree(source, root)
    damage(root, "vectors", "garbage")
    damage(root, "faiss", "truncated")
    damage(root, "manifest", "deleted")
    found = verify_index(root)
    assert found.problems == 3
    assert any("vectors.npy: " in line and "re-embedded" in line for line in found.lines)
    report = repair_index(root, embedder=embedder, tokenizer=tokenizer)
    assert report.lines[-1] == f"committed v000004 ({n} chunks)"
    assert any("re-embedded" in line for line in report.lines)
    index = DocumentIndex.open(root, embedder=embedder, tokenizer=tokenizer)
    assert index.warnings == [] and verify_index(root).problems == 0
    assert_same_results(results(index), want)
    assert repair_index(root).lines == [
        "nothing to repair: v000004 and manifest.json are intact"
    ]


def test_lost_manifest_never_loses_versions(pristine, tmp_path, capsys):
    """The probe's data loss: no manifest, then `covey index` over the folder."""
    from covey.cli.main import main

    source, _, _, n = pristine
    root = tmp_path / "idx"
    shutil.copytree(source, root)
    (root / "manifest.json").unlink()
    new = tmp_path / "new.txt"
    new.write_text("Volcanoes erupt when magma rises.")
    assert main(["index", str(new), "--index", str(root), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert f"holds {n + 1} chunks" in out
    assert err.count("manifest.json") == 1 and "manifest.json is missing; serving v000003" in err
    assert sorted(p.name for p in (root / "versions").iterdir()) == ["v000003", "v000004"]


def test_create_refuses_a_folder_with_versions(pristine, tmp_path, embedder, tokenizer):
    root = tmp_path / "idx"
    shutil.copytree(pristine[0], root)
    (root / "manifest.json").unlink()
    with pytest.raises(RetrievalError, match="an index already exists"):
        DocumentIndex.create(root, embedder=embedder, tokenizer=tokenizer)


def test_commit_on_an_older_manifest_keeps_the_newer_version(
    pristine, tmp_path, embedder, tokenizer
):
    """A restored old manifest must not make the next commit reuse or drop v000003."""
    root = tmp_path / "idx"
    shutil.copytree(pristine[0], root)
    damage(root, "manifest", "swapped")
    index = DocumentIndex.open(root, embedder=embedder, tokenizer=tokenizer)
    assert index.manifest["version"] == "v000003"
    index.add_texts(["Glaciers carve valleys."], source="ice")
    assert index.manifest["version"] == "v000004"
    assert index.manifest["previous_version"] == "v000003"
    assert (root / "versions" / "v000003" / "version.json").is_file()


def test_inconsistent_state_is_never_committed(pristine, tmp_path, embedder, tokenizer):
    root = tmp_path / "idx"
    shutil.copytree(pristine[0], root)
    index = DocumentIndex.open(root, embedder=embedder, tokenizer=tokenizer)
    index.vectors = index.vectors[:-1]
    with pytest.raises(RetrievalError, match="refusing to commit an inconsistent index"):
        index.commit()
    assert sorted(p.name for p in (root / "versions").iterdir()) == ["v000002", "v000003"]


@pytest.mark.parametrize("verb", ["verify", "repair"])
def test_cli_verify_and_repair(pristine, tmp_path, capsys, verb):
    from covey.cli.main import main

    root = tmp_path / "idx"
    shutil.copytree(pristine[0], root)
    damage(root, "faiss", "garbage")
    if verb == "verify":
        assert main(["index", "--verify", str(root)]) == 2
        out, err = capsys.readouterr()
        assert "v000003 (newest): 5 chunks from 5 sources, faiss hnsw: index.faiss: " in out
        assert err.strip().splitlines() == [
            f"covey: error: index {root} has 1 problem(s); run `covey index --repair {root}`"
        ]
        return
    assert main(["index", "--repair", str(root)]) == 0
    assert "index.faiss: " in capsys.readouterr().out
    assert main(["index", "--verify", str(root)]) == 0
    assert "v000004 (newest): 5 chunks from 5 sources, faiss hnsw: ok" in capsys.readouterr().out
    assert main(["index", "--verify", str(root), "--index", "x"]) == 2
    assert "covey: error: --verify DIR takes no PATH and no --index" in capsys.readouterr().err


def test_newer_folder_without_a_record_is_never_collected(
    pristine, tmp_path, embedder, tokenizer
):
    """The newest version's record and the manifest are both lost: the older version is
    served with a warning that says so, no commit goes on top (the one after it used to
    delete the newer folder), and --repair restores the newer one from its own data."""
    source, want, previous, n = pristine
    root = tmp_path / "idx"
    shutil.copytree(source, root)
    (root / "versions/v000003/version.json").unlink()
    (root / "manifest.json").unlink()
    index = DocumentIndex.open(root, embedder=embedder, tokenizer=tokenizer)
    assert index.manifest["version"] == "v000002"
    assert_same_results(results(index), previous)
    assert not any("newest version" in w for w in index.warnings), index.warnings
    assert any(
        "v000003 is newer than v000002 but has no usable version.json (missing): not served"
        in w
        for w in index.warnings
    ), index.warnings
    with pytest.raises(RetrievalError, match=r"refusing to commit on top of v000002: .*--repair"):
        index.add_texts(["Glaciers carve valleys."], source="ice")
    assert sorted(p.name for p in (root / "versions").iterdir()) == ["v000002", "v000003"]

    found = verify_index(root)
    assert any(line.startswith("v000003 (newest): 5 chunks") for line in found.lines), found
    assert found.problems >= 2  # the manifest, and v000003's record
    report = repair_index(root, embedder=embedder, tokenizer=tokenizer)
    assert report.lines[-1] == f"committed v000004 ({n} chunks)", report.lines
    assert not any("restored" in line for line in report.lines)  # nothing was lost
    repaired = DocumentIndex.open(root, embedder=embedder, tokenizer=tokenizer)
    assert repaired.warnings == [] and verify_index(root).problems == 0
    assert_same_results(results(repaired), want)
    # Each later commit collects only what its parent superseded.
    repaired.add_texts(["Glaciers carve valleys."], source="ice")
    assert sorted(p.name for p in (root / "versions").iterdir()) == ["v000004", "v000005"]


@pytest.mark.parametrize("how", ["garbage", "swapped"])
def test_repair_keeps_a_version_whose_only_damage_is_its_record(
    how, pristine, tmp_path, embedder, tokenizer
):
    source, want, _, n = pristine
    root = tmp_path / "idx"
    shutil.copytree(source, root)
    damage(root, "record", how)
    report = repair_index(root, embedder=embedder, tokenizer=tokenizer)
    assert any("v000003: version.json: " in line and "rewritten" in line for line in report.lines)
    assert report.lines[-1] == f"committed v000004 ({n} chunks)", report.lines
    index = DocumentIndex.open(root, embedder=embedder, tokenizer=tokenizer)
    assert index.warnings == [] and verify_index(root).problems == 0
    assert_same_results(results(index), want)


def test_reader_retries_when_a_writer_collects_its_version(
    pristine, tmp_path, embedder, tokenizer, monkeypatch
):
    """Checkpoints commit often; a reader that listed the versions just before two commits
    finds its folder collected. It must list again, not call the index damaged."""
    source, want, _, n = pristine
    root = tmp_path / "idx"
    shutil.copytree(source, root)
    writer = DocumentIndex.open(root, embedder=embedder, tokenizer=tokenizer)
    real = store.check_version
    calls = []

    def check_after_two_commits(folder, *args):
        if not calls:
            writer.add_texts(["Glaciers carve valleys."], source="ice")
            writer.add_texts(["Deserts get little rain."], source="dry")
            assert not folder.exists()  # collected under the reader's feet
        calls.append(folder.name)
        return real(folder, *args)

    monkeypatch.setattr(store, "check_version", check_after_two_commits)
    index = DocumentIndex.open(root, embedder=embedder, tokenizer=tokenizer)
    assert calls == ["v000003", "v000005"]
    assert index.warnings == [] and len(index) == n + 2


def test_damaged_vectors_are_re_embedded_only_when_needed(
    pristine, tmp_path, embedder, tokenizer, caplog
):
    source, want, _, n = pristine
    root = tmp_path / "idx"
    shutil.copytree(source, root)
    damage(root, "vectors", "garbage")
    caplog.set_level(logging.WARNING, logger="covey.retrieval")
    index = DocumentIndex.open(root, embedder=embedder, tokenizer=tokenizer)
    (opened,) = index.warnings
    assert "re-embedded from chunks.sqlite when a vector search or a write first" in opened
    assert f"on every open until `covey index --repair {root}` stores them" in opened
    assert_same_results(results(index), want)
    assert index._vectors is None  # BM25, and the intact HNSW file, do not need them
    hit = index.search("rocket in orbit", k=1, mode="vector", sources=["space"])[0]
    assert hit.chunk.source == "space" and index._vectors is not None  # exact, filtered
    done = index.warnings[-1]
    assert re.search(rf"vectors.npy: re-embedded {n} chunks in \d+\.\d s; `covey index", done)
    assert_same_results(results(index), want)
    assert caplog.text.count("re-embedding its 5 chunks") == 1  # once, not per search
