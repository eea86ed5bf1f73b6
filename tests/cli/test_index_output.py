"""What the retrieval commands print, run as a user runs them: no "Loading weights" bar
from commands that load no LLM. What `covey chat --docs --index` says of the user's own
index is checked in the same run as its answer (tests/apps/test_chat_docs_cli.py): each
such run loads the model."""

from __future__ import annotations

import pytest

from covey.cli.main import main
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


def test_settings_of_an_existing_index_are_refused_when_they_differ(own_index, capsys):
    """Chunking and the faiss kind are fixed at creation: other values would be ignored,
    and the summary would still show the old ones. The creating command's values pass."""
    folder = str(own_index.parent / "docs")
    asked = ["--chunk-tokens", "50", "--overlap-tokens", "32", "--kind", "hnsw"]
    assert main(["index", folder, "--index", str(own_index), *asked, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert (
        f"--chunk-tokens 50, --kind hnsw: the index at {own_index} was created with "
        "--chunk-tokens 200, --kind auto, and these are chosen at creation" in err
    )
    same = ["--chunk-tokens", "200", "--overlap-tokens", "32", "--kind", "auto", "--quiet"]
    assert main(["index", folder, "--index", str(own_index), *same]) == 0
    assert "2 unchanged" in capsys.readouterr().out
