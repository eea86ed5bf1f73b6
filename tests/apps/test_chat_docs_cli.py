"""`covey chat --docs`: the default RAG app in a terminal, run as a user runs it."""

from __future__ import annotations

from tests.cli.runner import covey


def test_docs_chat_names_its_index_streams_an_answer_and_lists_its_sources(tiny_index, tmp_path):
    """Quitting also closes the engine: its chunk store writes what host memory holds to
    --chunk-store-dir (a host tier this large evicts nothing there on its own)."""
    folder = tmp_path / "kv"
    result = covey(
        "chat",
        "--docs",
        "--index",
        str(tiny_index.root),
        "--max-tokens",
        "16",
        "--chunk-store-dir",
        str(folder),
        stdin="How does the for statement iterate?\n/reset\n\n/exit\n",
    )
    assert result.returncode == 0, result.stderr
    # The banner names the user's index, its size and its first sources, not Python's docs.
    banner = next(line for line in result.stderr.splitlines() if "answering from" in line)
    size = f"{len(tiny_index.chunks)} chunks from 5 sources"
    shown = "pydoc:dict, pydoc:for, pydoc:lambda, ..."
    assert f"answering from the index {tiny_index.root} ({size}: {shown})" in banner, banner
    assert "Python" not in banner
    lines = result.stdout.splitlines()
    sources = [line for line in lines if line.startswith(("Sources:", "Retrieved (none cited):"))]
    assert len(sources) == 1 and "pydoc:for" in sources[0]
    assert "(conversation cleared)" in result.stdout
    assert list(folder.rglob("*.safetensors")), "the chunk store was not closed"


def test_docs_chat_refuses_a_missing_index_folder(tmp_path):
    result = covey("chat", "--docs", "--index", str(tmp_path / "nothing-here"), stdin="/exit\n")
    assert result.returncode == 3 and "nothing-here" in result.stderr, result.stderr
