"""Turn files and folders into Documents: plain text, Markdown and HTML.

Unreadable or binary files are skipped and reported by name rather than aborting a
large ingest; the caller decides how loudly to say so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from covey.errors import RetrievalError
from covey.retrieval.documents import Document

logger = logging.getLogger("covey.retrieval")

HTML_SUFFIXES = frozenset({".html", ".htm", ".xhtml"})
# Elements whose text is never content a reader would want retrieved.
_HTML_DROP = ("script", "style", "noscript", "template", "head")


@dataclass
class LoadReport:
    """What a load produced: documents, plus (path, reason) for every file it skipped."""

    documents: list[Document] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def skip(self, path: Path, reason: str) -> None:
        logger.warning("skipping %s: %s", path, reason)
        self.skipped.append((str(path), reason))


def html_to_text(html: str) -> str:
    """Visible text of an HTML page, one block element per line, via BeautifulSoup."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    for tag in soup(_HTML_DROP):
        tag.decompose()
    lines = (line.strip() for line in soup.get_text("\n").splitlines())
    return "\n".join(line for line in lines if line)


def _decode(data: bytes) -> str | None:
    """UTF-8 text, or None for binary data (NUL bytes or invalid UTF-8)."""
    if b"\x00" in data[:8192]:
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def load_file(path: Path, report: LoadReport) -> None:
    """Append the file's Document to `report`, or record why it was skipped."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        report.skip(path, f"unreadable ({exc.strerror or exc})")
        return
    text = _decode(data)
    if text is None:
        report.skip(path, "binary or not UTF-8 text")
        return
    if path.suffix.lower() in HTML_SUFFIXES:
        text = html_to_text(text)
    if not text.strip():
        report.skip(path, "empty")
        return
    report.documents.append(Document(text=text, source=str(path.resolve())))


def load_paths(paths: list[str | Path]) -> LoadReport:
    """Load files, and folders recursively (hidden entries skipped); HTML by suffix.

    A path that does not exist is a user error, not a skip: it is almost always a typo.
    """
    report = LoadReport()
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise RetrievalError(f"no such file or directory: {path}")
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                rel = child.relative_to(path).parts
                if child.is_file() and not any(p.startswith(".") for p in rel):
                    load_file(child, report)
        else:
            load_file(path, report)
    return report
