from __future__ import annotations

from pathlib import Path

import pytest

from covey.errors import RetrievalError
from covey.retrieval.loaders import html_to_text, load_paths


def test_loads_text_markdown_html_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("plain text file")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("# Title\n\nSome *markdown*.")
    (tmp_path / "sub" / "c.html").write_text(
        "<html><head><title>t</title><style>p{}</style></head><body><h1>Heading</h1>"
        "<p>Para <b>bold</b> text.</p><script>var secret = 1;</script></body></html>"
    )
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("should not be read")
    report = load_paths([tmp_path])
    texts = {Path(d.source).name: d.text for d in report.documents}
    assert set(texts) == {"a.txt", "b.md", "c.html"}
    assert "Heading" in texts["c.html"] and "bold" in texts["c.html"]
    assert "secret" not in texts["c.html"] and "p{}" not in texts["c.html"]
    assert report.skipped == []


def test_html_to_text_keeps_blocks_on_lines():
    assert html_to_text("<div>one</div><div>two</div>").splitlines() == ["one", "two"]


def test_binary_and_empty_files_are_skipped_by_name(tmp_path, caplog):
    binary = tmp_path / "image.png"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    good = tmp_path / "good.txt"
    good.write_text("fine")
    report = load_paths([tmp_path])
    assert [Path(d.source).name for d in report.documents] == ["good.txt"]
    skipped = dict(report.skipped)
    assert skipped[str(binary)] == "binary or not UTF-8 text"
    assert skipped[str(latin)] == "binary or not UTF-8 text"
    assert skipped[str(empty)] == "empty"
    assert f"skipped {binary}" in caplog.text


def test_unreadable_file_is_skipped_by_name(tmp_path, monkeypatch):
    bad = tmp_path / "locked.txt"
    bad.write_text("secret")
    real = Path.read_bytes

    def read_bytes(self):
        if self == bad:
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    report = load_paths([bad])
    assert report.documents == []
    assert report.skipped == [(str(bad), "unreadable (Permission denied)")]


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(RetrievalError, match="no such file or directory: .*nope"):
        load_paths([tmp_path / "nope"])


def test_symlink_to_a_file_in_the_folder_is_ingested_once(tmp_path, caplog):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").symlink_to(tmp_path / "a.txt")
    report = load_paths([tmp_path])
    assert [d.source for d in report.documents] == [str(tmp_path / "a.txt")]
    assert report.aliases == [(str(tmp_path / "b.txt"), str(tmp_path / "a.txt"))]
    assert report.skipped == []
    assert caplog.text.count("b.txt resolves to") == 1


def test_overlapping_arguments_are_deduplicated(tmp_path, caplog):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_text("beta")
    report = load_paths([tmp_path, tmp_path / "sub", tmp_path / "b.txt", tmp_path])
    assert sorted(Path(d.source).name for d in report.documents) == ["a.txt", "b.txt"]
    assert report.aliases == [] and report.skipped == [] and caplog.text == ""


def test_dangling_links_and_loops_are_skipped_with_a_reason(tmp_path, caplog):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "ok.txt").write_text("fine")
    (folder / "dangling.txt").symlink_to(tmp_path / "nowhere.txt")
    (folder / "loop1").symlink_to(folder / "loop2")
    (folder / "loop2").symlink_to(folder / "loop1")
    (folder / "sub" / "up").symlink_to(folder, target_is_directory=True)  # a folder loop
    report = load_paths([folder])
    assert [Path(d.source).name for d in report.documents] == ["ok.txt"]
    assert dict(report.skipped) == {
        str(folder / "dangling.txt"): f"dangling symlink (to {tmp_path / 'nowhere.txt'})",
        str(folder / "loop1"): "symlink loop",
        str(folder / "loop2"): "symlink loop",
        str(folder / "sub" / "up"): f"symlink loop (leads back to {folder})",
    }
    for path, _ in report.skipped:  # each warned about exactly once
        assert caplog.text.count(f"skipped {path}:") == 1


def test_symlinked_folder_is_followed_and_a_dangling_argument_skipped(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "c.txt").write_text("gamma")
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "linked").symlink_to(outside, target_is_directory=True)
    (tmp_path / "gone").symlink_to(tmp_path / "missing")
    report = load_paths([folder, tmp_path / "gone"])
    assert [d.source for d in report.documents] == [str(outside / "c.txt")]
    reason = f"dangling symlink (to {tmp_path / 'missing'})"
    assert report.skipped == [(str(tmp_path / "gone"), reason)]


def test_aliased_files_ingest_into_an_index(tmp_path, make_index):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("Rockets reach orbit.")
    (folder / "same.txt").symlink_to(folder / "a.txt")
    stats = make_index().add_files([folder, folder / "a.txt"])
    assert (stats.documents, stats.added_chunks) == (1, 1)
    assert stats.aliases == [(str(folder / "same.txt"), str(folder / "a.txt"))]


def test_alias_named_when_the_link_sorts_before_its_target(tmp_path, caplog):
    (tmp_path / "b.txt").write_text("beta")
    (tmp_path / "a.txt").symlink_to(tmp_path / "b.txt")  # visited first
    report = load_paths([tmp_path])
    assert [d.source for d in report.documents] == [str(tmp_path / "b.txt")]
    assert report.aliases == [(str(tmp_path / "a.txt"), str(tmp_path / "b.txt"))]
    assert caplog.text.count("a.txt resolves to") == 1 and "b.txt resolves to" not in caplog.text


def test_a_file_removed_while_loading_is_skipped(tmp_path, monkeypatch):
    """Listed, then gone before it is read (another process cleaning up): a skip."""
    (tmp_path / "kept.txt").write_text("kept")
    ghost = tmp_path / "gone.txt"
    real = Path.iterdir

    def iterdir_with_a_removed_file(self):
        yield from real(self)
        if self == tmp_path:
            yield ghost

    monkeypatch.setattr(Path, "iterdir", iterdir_with_a_removed_file)
    report = load_paths([tmp_path])
    assert [Path(d.source).name for d in report.documents] == ["kept.txt"]
    assert report.skipped == [(str(ghost), "vanished while loading")]
