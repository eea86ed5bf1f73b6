"""`covey index --verify` and `--repair`: report every version's integrity, and restore the
newest consistent version as a new commit.

Verify only reads. Repair keeps what can be kept: it starts from the newest version whose
record and chunk store are intact, re-embeds its vectors or rebuilds its faiss index if
those are damaged, and commits the result as a new version with a fresh manifest. When the
newest version's chunks are lost, the older version it restores is named, so nothing is
dropped without saying so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from covey.errors import IndexNotFoundError, RetrievalError
from covey.retrieval import store
from covey.retrieval.embedder import EmbedderLike
from covey.retrieval.integrity import CHUNKS, FAISS, MANIFEST, RECORD, VECTORS, VersionCheck
from covey.retrieval.tokenizers import TokenizerLike

_RECOVERABLE = {
    RECORD: "the data files are intact; --repair rewrites the record",
    VECTORS: "re-embedded from chunks.sqlite on open and by --repair",
    FAISS: "rebuilt from vectors.npy on open and by --repair",
}


@dataclass
class HealthReport:
    """One line per finding; `problems` counts those that --repair would act on."""

    root: Path
    lines: list[str] = field(default_factory=list)
    problems: int = 0


def _manifest_line(listing: store.Listing, served: VersionCheck | None) -> tuple[str, bool]:
    manifest = listing.manifest
    if not manifest.exists:
        return f"{MANIFEST}: missing", True
    if manifest.content is None:
        return f"{MANIFEST}: {manifest.problem}", True
    named = manifest.named
    if served is None or named != served.name:
        latest = served.name if served else "none"
        older = served is not None and named in listing.folders and named < served.name
        if older and store._writer_active(listing.root):  # a commit between rename and manifest
            return f"{MANIFEST}: names {named} (a writer is committing {latest})", False
        return f"{MANIFEST}: names {named}, but the version served is {latest}", True
    if served.record_from == "own" and store.records_differ(manifest.content, served.record):
        return f"{MANIFEST}: disagrees with {named}/{RECORD}", True
    return f"{MANIFEST}: ok (names {named})", False


def _version_line(check: VersionCheck, tag: str, older: bool) -> str:
    """One version's state; an older version (never served, collected by a later commit)
    gets no advice on what --repair would do, as it does nothing to it."""
    if check.record is None:
        return f"{check.name}{tag}: {RECORD}: {check.problems[RECORD]}"
    r = check.record
    head = (
        f"{check.name}{tag}: {r['num_chunks']} chunks from {r.get('num_sources', '?')} "
        f"sources, faiss {r['index'].get('kind', '?')}"
    )
    if check.record_from == "manifest" and RECORD not in check.problems:
        head += f" (written by an older covey: its record is {MANIFEST})"
    hints = {} if older else _RECOVERABLE
    found = [
        f"{name}: {why}" + (f" ({hints[name]})" if name in hints else "")
        for name, why in check.problems.items()
    ]
    if check.orphans:
        listed = ", ".join(f"{s} ({n})" for s, n in list(check.orphans.items())[:5])
        found.append(
            f"{CHUNKS}: chunks of unfinished, unmarked sources: {listed} (--repair records "
            "them as partial)"
        )
    return f"{head}: " + ("; ".join(found) if found else "ok")


def verify_index(root: str | Path) -> HealthReport:
    """Check the manifest and every version folder, newest first; changes nothing. The
    version served and any newer folder count as problems; older ones are only shown."""
    root = Path(root)
    listing, checks = store.check_all(root)
    if not checks and not listing.manifest.exists:
        raise IndexNotFoundError(f"no index at {root} (no {MANIFEST}, no version folders)")
    report = HealthReport(root)
    served = next((c for c in checks if c.name == listing.served), None)
    line, bad = _manifest_line(listing, served)
    report.lines.append(line)
    report.problems += bad
    for i, check in enumerate(checks):
        tag = " (newest)" if i == 0 else ""
        if check is served and i > 0:
            tag = " (served)"
        older = listing.served is not None and check.name < listing.served
        line = _version_line(check, tag, older)
        if older and not check.ok:  # never served; a later commit collects it
            line += " (an older version: not served)"
        elif check.name in listing.unrecorded and listing.served is None:
            line += " (no version has a record: none is served)"
        elif check.name in listing.unrecorded:
            line += " (newer than the version served: --repair decides)"
        report.lines.append(line)
        if not older:
            report.problems += len(check.problems) + bool(check.orphans)
        partial = (check.record or {}).get("partial") if check is served else None
        for source, info in store.partial_sources({"partial": partial}).items():
            report.lines.append(
                f"{check.name}: holds the first {info['chunks']} chunks of {source} (an "
                "interrupted ingest: re-run it to finish)"
            )
    return report


def repair_index(
    root: str | Path,
    embedder: EmbedderLike | None = None,
    tokenizer: TokenizerLike | None = None,
) -> HealthReport:
    """Commit the newest consistent version as a new version; says what it did. Folders
    without a record (written by an older covey, or whose record was lost) are candidates
    too, checked against a record rebuilt from their own data files."""
    from covey.retrieval.document_index import DocumentIndex
    from covey.retrieval.vector_index import IndexConfig

    root = Path(root)
    listing, checks = store.check_all(root)
    if not checks:
        raise IndexNotFoundError(f"no index at {root}: {root / 'versions'} holds no version")
    report = HealthReport(root)
    served = next((c for c in checks if c.name == listing.served), None)
    manifest_line, manifest_bad = _manifest_line(listing, served)
    if not manifest_bad and served is checks[0] and served.ok:
        report.lines.append(f"nothing to repair: {served.name} and {MANIFEST} are intact")
        return report
    target = next((c for c in checks if c.chunks_usable), None)
    if target is None:
        newest = checks[0]
        file = newest.fatal_file
        hint = ""
        if listing.template() is None:
            hint = f" and no {MANIFEST} or {RECORD} says which embedder and chunker built it"
        raise RetrievalError(
            f"cannot repair {root}: no version has a usable record and chunk store "
            f"({newest.folder / file}: {newest.problems[file]}){hint}; rebuild the index "
            "from its sources"
        )
    if manifest_bad:
        report.lines.append(f"{manifest_line}: rewritten")
    for lost in checks[: checks.index(target)]:
        file = lost.fatal_file
        report.lines.append(
            f"{lost.name}: {file}: {lost.problems[file]}: its chunks cannot be recovered; "
            f"restored {target.name} ({len(target.chunks or [])} chunks) instead"
        )
    _describe_fixes(target, report)
    assert target.record is not None and target.chunks is not None
    snap = store.Snapshot(
        target.record,
        target.chunks,
        target.sources or {},
        target.vectors,
        target.faiss_index,
        orphans=target.orphans,
    )
    index = DocumentIndex(
        root, snap, embedder, tokenizer, IndexConfig(**target.record["index"]["config"])
    )
    index._version = listing.served  # the newest recorded version, damaged or not
    index._commit(repair=True)
    report.problems = len(report.lines)
    report.lines.append(f"committed {index.manifest['version']} ({len(index)} chunks)")
    return report


def _describe_fixes(target: VersionCheck, report: HealthReport) -> None:
    n = len(target.chunks or [])
    if RECORD in target.problems:
        report.lines.append(f"{target.name}: {RECORD}: {target.problems[RECORD]}: rewritten")
    if VECTORS in target.problems:
        report.lines.append(
            f"{target.name}: {VECTORS}: {target.problems[VECTORS]}: re-embedded {n} chunks "
            f"from {CHUNKS}"
        )
    if FAISS in target.problems:
        report.lines.append(f"{target.name}: {FAISS}: {target.problems[FAISS]}: rebuilt")
    if target.orphans:
        report.lines.append(
            f"{target.name}: {CHUNKS}: chunks of {len(target.orphans)} unfinished sources "
            "recorded as partial (re-run their ingest to finish them)"
        )
