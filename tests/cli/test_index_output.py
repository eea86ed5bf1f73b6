"""What the retrieval commands print, run as a user runs them: no "Loading weights" bar
from commands that load no LLM. What `covey chat --docs --index` says of the user's own
index is checked in the same run as its answer (tests/apps/test_chat_docs_cli.py): each
such run loads the model."""

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
