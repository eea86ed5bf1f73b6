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
