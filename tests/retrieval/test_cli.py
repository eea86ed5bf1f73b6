"""`covey index` / `covey search` through the real entry point, covey.cli.main.main."""

from __future__ import annotations

import pytest

from covey.cli import main as cli_main
from covey.retrieval.default_corpus import (
    default_documents,
    default_index_dir,
    ensure_default_index,
    fill_index,
)
from covey.retrieval.document_index import DocumentIndex


@pytest.fixture(autouse=True)
def only_retrieval_commands(monkeypatch):
    """main() imports every subcommand module; the engine's may not exist yet, and these
    tests are about ours, so register only the retrieval commands."""
    monkeypatch.setattr(cli_main, "SUBCOMMAND_MODULES", ("covey.cli.retrieval_commands",))


def covey(*argv: str) -> int:
    return cli_main.main(list(argv))


@pytest.fixture
def docs(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "rockets.md").write_text("# Rockets\n\nA rocket burns fuel to reach orbit.")
    (folder / "bread.html").write_text("<p>Bread dough rises because yeast makes gas.</p>")
    (folder / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    return folder


def test_index_then_search(tmp_path, docs, capsys):
    idx = tmp_path / "idx"
    assert covey("index", str(docs), "--index", str(idx), "--quiet") == 0
    out, err = capsys.readouterr()
    assert "files: 2 read, 0 unchanged, 0 replaced, 1 skipped" in out
    assert "chunks: 2 added (2 embedded, 0 reused), 0 removed" in out
    assert "faiss flat" in out
    skip = f"covey: warning: skipped {docs / 'blob.bin'}: binary or not UTF-8 text"
    assert err.count(skip) == 1 and err.count("blob.bin") == 1  # printed once

    assert covey("index", str(docs), "--index", str(idx), "--quiet") == 0
    assert "files: 2 read, 2 unchanged" in capsys.readouterr().out

    assert covey("search", "why does dough rise", "--index", str(idx), "-k", "1") == 0
    out = capsys.readouterr().out
    assert out.startswith("1. score=") and "bread.html" in out and "yeast" in out
    assert "2. " not in out

    for mode in ("vector", "bm25", "hybrid"):
        assert covey("search", "rocket orbit", "--index", str(idx), "--mode", mode) == 0
        assert "rockets.md" in capsys.readouterr().out.splitlines()[0]


def test_index_progress_bar_and_approximate_kind(tmp_path, docs, capsys):
    idx = tmp_path / "idx"
    assert covey("index", str(docs), "--index", str(idx), "--kind", "hnsw") == 0
    out, err = capsys.readouterr()
    assert "embedding" in err and "chunk" in err  # tqdm progress bar on stderr
    assert "faiss hnsw, recall@10 1.000" in out


@pytest.mark.parametrize(
    ("argv", "message", "code"),
    [
        (["search", "", "--index", "X"], "query must be a non-empty string", 2),
        (["search", "q", "-k", "0", "--index", "X"], "k must be a positive integer, got 0", 2),
        (["search", "q", "--index", "{missing}"], "no index at {missing}", 3),
        (["index", "{missing}", "--index", "X"], "no such file or directory: {missing}", 2),
        (
            ["index", "{docs}", "--index", "X", "--chunk-tokens", "0"],
            "chunk_tokens must be > 0",
            2,
        ),
        (
            ["index", "{docs}", "--index", "X", "--checkpoint-chunks", "0"],
            "--checkpoint-chunks must be > 0, got 0",
            2,
        ),
        (
            ["index", "{docs}", "--index", "X", "--checkpoint-chunks", "-3"],
            "--checkpoint-chunks must be > 0, got -3",
            2,
        ),
        (
            ["index", "{docs}", "--index", "X", "--checkpoint-seconds", "0"],
            "--checkpoint-seconds must be > 0, got 0.0",
            2,
        ),
    ],
)
def test_errors_are_reported(tmp_path, docs, capsys, argv, message, code):
    """Exit codes by category: 2 for the caller's bad input, 3 for what does not exist."""
    missing = str(tmp_path / "missing")
    argv = [a.format(missing=missing, docs=docs).replace("X", str(tmp_path / "x")) for a in argv]
    assert covey(*argv) == code
    assert f"covey: error: {message.format(missing=missing)}" in capsys.readouterr().err


def test_search_defaults_to_the_python_docs_index(
    tmp_path, monkeypatch, capsys, embedder, tokenizer
):
    monkeypatch.setenv("COVEY_HOME", str(tmp_path / "home"))
    # the default index is always built whole (minutes): four documents recorded as the
    # whole corpus stand in for it
    built = DocumentIndex.create(default_index_dir(), embedder=embedder, tokenizer=tokenizer)
    fill_index(built, default_documents(limit=4))
    assert ensure_default_index().manifest["version"] == built.manifest["version"]
    assert built.root == tmp_path / "home" / "indexes" / "pydocs"
    assert min(built.sources).startswith("pydoc:")
    capsys.readouterr()
    assert covey("search", "assert statement", "-k", "2") == 0
    out = capsys.readouterr().out
    assert "pydoc:assert" in out.splitlines()[0]


def test_installed_entry_point_wires_the_commands(tmp_path):
    """The unpatched `covey` parser (every subcommand module) reaches our commands."""
    import subprocess
    import sys

    missing = tmp_path / "none"
    proc = subprocess.run(
        [sys.executable, "-m", "covey.cli.main", "search", "q", "--index", str(missing)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3
    assert f"covey: error: no index at {missing}" in proc.stderr


def test_search_prints_recovery_warnings_once_with_the_prefix(tmp_path, docs, capsys):
    idx = tmp_path / "idx"
    assert covey("index", str(docs), "--index", str(idx), "--quiet") == 0
    (idx / "manifest.json").unlink()
    capsys.readouterr()
    assert covey("search", "bread", "--index", str(idx), "--mode", "bm25") == 0
    err = capsys.readouterr().err
    assert err.count("manifest.json is missing") == 1
    assert f"covey: warning: {idx / 'manifest.json'} is missing; serving v000002" in err


def test_verify_during_a_commit_is_not_a_problem(tmp_path, docs, capsys):
    """Between a commit's rename and its manifest the manifest names the older version;
    --verify run then (the writer holds the lock) must not call that damage."""
    import json

    from covey.retrieval import store

    idx = tmp_path / "idx"
    assert covey("index", str(docs), "--index", str(idx), "--quiet") == 0
    record = json.loads((idx / "versions" / "v000001" / "version.json").read_text())
    (idx / "manifest.json").write_text(json.dumps(record))  # as if v000002's commit is midway
    with store.commit_lock(idx):
        assert covey("index", "--verify", str(idx)) == 0
    assert "manifest.json: names v000001 (a writer is committing v000002)" in (
        capsys.readouterr().out
    )
    assert covey("index", "--verify", str(idx)) == 2  # no writer: a stale manifest
    assert "names v000001, but the version served is v000002" in capsys.readouterr().out
