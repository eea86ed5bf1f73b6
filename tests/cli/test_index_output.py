"""What the retrieval commands and `covey chat --docs --index` print, run as a user runs
them: no "Loading weights" bar from commands that load no LLM, and a docs chat over the
user's own index says which index it answers from."""

from __future__ import annotations

import pytest

from tests.cli.runner import covey

BARS = ("Loading weights", "it/s]")


@pytest.fixture(scope="module")
def own_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    folder = root / "docs"
    folder.mkdir()
    (folder / "rockets.md").write_text("# Rockets\n\nA rocket burns fuel to reach orbit.")
    (folder / "bread.md").write_text("# Bread\n\nBread dough rises because yeast makes gas.")
    index = root / "idx"
    result = covey("index", str(folder), "--index", str(index), "--quiet")
    assert result.returncode == 0, result.stderr
    assert not [b for b in BARS if b in result.stderr], result.stderr
    return index


def test_search_prints_results_and_no_weights_bar(own_index):
    result = covey("search", "why does dough rise", "--index", str(own_index), "-k", "1")
    assert result.returncode == 0, result.stderr
    assert "bread.md" in result.stdout
    assert not [b for b in BARS if b in result.stderr], result.stderr


def test_docs_chat_over_an_own_index_names_that_index(own_index):
    result = covey("chat", "--docs", "--index", str(own_index), stdin="/exit\n")
    assert result.returncode == 0, result.stderr
    banner = next(line for line in result.stderr.splitlines() if "answering from" in line)
    assert f"answering from the index {own_index} (2 chunks from 2 sources: " in banner
    assert "bread.md" in banner and "rockets.md" in banner
    assert "Python" not in banner
