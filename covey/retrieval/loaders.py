"""Turn files and folders into Documents: plain text, Markdown and HTML.

Unreadable or binary files are skipped and reported by name rather than aborting a
large ingest; the caller decides how loudly to say so.
"""

from __future__ import annotations

import errno
import logging
import os
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
    """What a load produced: documents, (path, reason) for every file it skipped, and
    (path, target) for every path that resolved to a file already loaded under another name
    (a symlink, a hard path alias): that file is ingested once, under its resolved path."""

    documents: list[Document] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    aliases: list[tuple[str, str]] = field(default_factory=list)
    # Resolved path -> the (absolute, unresolved) path it was first loaded through.
    _seen: dict[Path, Path] = field(default_factory=dict, repr=False)

    def skip(self, path: Path, reason: str) -> None:
        logger.warning("skipped %s: %s", path, reason)
        self.skipped.append((str(path), reason))

    def alias(self, path: Path, target: Path) -> None:
        logger.warning("%s resolves to %s, ingested once under that name", path, target)
        self.aliases.append((str(path), str(target)))

    def first_visit(self, path: Path, resolved: Path) -> bool:
        """True the first time `resolved` is reached; later arrivals through another name
        are recorded as aliases, through the same name (overlapping arguments) dropped."""
        here = Path(os.path.abspath(path))
        seen = self._seen.get(resolved)
        if seen is None:
            self._seen[resolved] = here
            return True
        if seen != here:  # name the path that is not the file itself (the link)
            alias = seen if _is_itself(here, resolved) and not _is_itself(seen, resolved) else here
            self.alias(alias, resolved)
        return False


def _is_itself(path: Path, resolved: Path) -> bool:
    """True when `path` names the file directly (its last component is no link), so the
    other name of the same file is the alias, whichever of the two was visited first."""
    return Path(os.path.realpath(path.parent)) / path.name == resolved


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


def _resolve(path: Path, report: LoadReport) -> Path | None:
    """The real path behind `path`, or None (recorded as skipped) for a dangling link or a
    symlink loop."""
    try:
        return path.resolve(strict=True)
    except FileNotFoundError:
        try:
            report.skip(path, f"dangling symlink (to {os.readlink(path)})")
        except OSError:  # removed since it was listed, or not a link at all
            report.skip(path, "vanished while loading")
    except RuntimeError:  # Python < 3.13 reports a loop this way
        report.skip(path, "symlink loop")
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            report.skip(path, "symlink loop")
        else:
            report.skip(path, f"unreadable ({exc.strerror or exc})")
    return None


def load_file(path: Path, report: LoadReport, resolved: Path | None = None) -> None:
    """Append the file's Document to `report`, or record why it was skipped."""
    resolved = resolved or _resolve(path, report)
    if resolved is None or not report.first_visit(path, resolved):
        return
    if not resolved.is_file():
        report.skip(path, "not a regular file")
        return
    try:
        data = resolved.read_bytes()
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
    report.documents.append(Document(text=text, source=str(resolved)))


def _load_folder(folder: Path, report: LoadReport, ancestors: frozenset[Path]) -> None:
    """Load a folder's files depth first in sorted order, hidden entries skipped. Symlinked
    folders are followed, except one that leads back into its own ancestors (a loop)."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        report.skip(folder, f"unreadable folder ({exc.strerror or exc})")
        return
    for child in entries:
        if child.name.startswith("."):
            continue
        resolved = _resolve(child, report)
        if resolved is None:
            continue
        if not resolved.is_dir():
            load_file(child, report, resolved)
        elif resolved in ancestors:
            report.skip(child, f"symlink loop (leads back to {resolved})")
        elif report.first_visit(child, resolved):
            _load_folder(child, report, ancestors | {resolved})


def load_paths(paths: list[str | Path]) -> LoadReport:
    """Load files, and folders recursively (hidden entries skipped); HTML by suffix. A file
    reached twice (overlapping arguments, a symlink to a file also loaded) is loaded once.

    A path that does not exist is a user error, not a skip: it is almost always a typo.
    """
    report = LoadReport()
    for raw in paths:
        path = Path(raw)
        if not path.exists() and not path.is_symlink():
            raise RetrievalError(f"no such file or directory: {path}")
        resolved = _resolve(path, report)
        if resolved is None:
            continue
        if not resolved.is_dir():
            load_file(path, report, resolved)
        elif report.first_visit(path, resolved):
            _load_folder(path, report, frozenset({resolved}))
    return report
